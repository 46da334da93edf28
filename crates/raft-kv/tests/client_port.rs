//! The client port's limits, probed as a hostile or careless client would:
//! pre-AUTH request limits, `maxclients`, the idle timeout, the output
//! limit, the unknown-command error's size, AUTH forms, TLS with and
//! without client certificates, and a drain at shutdown.

use raft_core::{ChannelNetwork, Config, MemLogStore};
use raft_kv::node::KvNode;
use raft_kv::server::{serve, ClientConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

struct Port {
    addr: std::net::SocketAddr,
    node: Arc<KvNode>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// A one-node store and its client port with `cfg`.
async fn port(cfg: ClientConfig) -> Port {
    let dir = tempfile::tempdir().unwrap();
    let net = ChannelNetwork::new();
    let node = KvNode::start_with(
        Config::new(1),
        &dir.path().join("n"),
        0,
        MemLogStore::new(),
        net.join(1),
    )
    .await
    .unwrap();
    for _ in 0..500 {
        if node.raft().is_leader() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.raft().is_leader());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve(
        listener,
        node.clone(),
        cfg,
        node.metrics().clone(),
        stop_rx,
    ));
    Port {
        addr,
        node,
        stop,
        task,
        _dir: dir,
    }
}

/// Reads one whole reply (or what came before the connection closed).
async fn reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while raft_kv::resp::reply_len(&got).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("no reply within 30 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn ask<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> String {
    s.write_all(req).await.unwrap();
    reply(s).await
}

/// True once the server closed the connection (reads end).
async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn bulk_request(args: &[&[u8]]) -> Vec<u8> {
    let mut r = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        r.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        r.extend_from_slice(a);
        r.extend_from_slice(b"\r\n");
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_auth_requests_are_small_and_auth_takes_the_default_user() {
    let p = port(ClientConfig {
        password: Some("s3cret".into()),
        ..Default::default()
    })
    .await;
    // Eleven elements before AUTH: refused from the header, connection closed.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let r = ask(&mut s, b"*11\r\n").await;
    assert_eq!(r, "-ERR Protocol error: invalid multibulk length\r\n");
    assert!(closed(&mut s).await);
    // A 16 KiB + 1 argument before AUTH: refused before its bytes come.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let r = ask(&mut s, b"*2\r\n$4\r\nAUTH\r\n$16385\r\n").await;
    assert_eq!(r, "-ERR Protocol error: invalid bulk length\r\n");
    assert!(closed(&mut s).await);
    // Small requests before AUTH get NOAUTH; AUTH forms.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        ask(&mut s, b"GET a\r\n").await,
        "-NOAUTH Authentication required.\r\n"
    );
    assert!(ask(&mut s, b"AUTH wrong\r\n")
        .await
        .starts_with("-WRONGPASS"));
    assert!(ask(&mut s, b"AUTH someone s3cret\r\n")
        .await
        .starts_with("-WRONGPASS"));
    assert!(ask(&mut s, b"AUTH s3cret0\r\n")
        .await
        .starts_with("-WRONGPASS"));
    assert_eq!(ask(&mut s, b"AUTH default s3cret\r\n").await, "+OK\r\n");
    // After AUTH the full limits hold: a 1 MiB value and 20 arguments.
    let big = vec![b'v'; 1 << 20];
    assert_eq!(
        ask(&mut s, &bulk_request(&[b"SET", b"k", &big])).await,
        "+OK\r\n"
    );
    let many: Vec<&[u8]> = std::iter::once(b"MGET".as_slice())
        .chain(std::iter::repeat_n(b"k".as_slice(), 19))
        .collect();
    assert!(ask(&mut s, &bulk_request(&many))
        .await
        .starts_with("*19\r\n"));
    let mut s2 = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(ask(&mut s2, b"AUTH s3cret\r\n").await, "+OK\r\n");
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maxclients_refuses_the_one_too_many_and_frees_its_place() {
    let p = port(ClientConfig {
        max_clients: 2,
        ..Default::default()
    })
    .await;
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    let mut b = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(ask(&mut a, b"PING\r\n").await, "+PONG\r\n");
    assert_eq!(ask(&mut b, b"PING\r\n").await, "+PONG\r\n");
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        reply(&mut c).await,
        "-ERR max number of clients reached\r\n"
    );
    assert!(closed(&mut c).await);
    drop(a);
    // The place frees once the server has seen the close.
    let mut ok = false;
    for _ in 0..200 {
        let mut d = TcpStream::connect(p.addr).await.unwrap();
        d.write_all(b"PING\r\n").await.unwrap();
        if reply(&mut d).await == "+PONG\r\n" {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a closed client's place was never freed");
    let text = p.node.metrics().render(&p.node);
    assert!(
        text.contains("raftkv_client_connections_rejected_total{reason=\"maxclients\"}"),
        "{text}"
    );
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_client_is_closed_after_the_timeout_and_a_busy_one_is_not() {
    let p = port(ClientConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(ask(&mut idle, b"PING\r\n").await, "+PONG\r\n");
    let mut busy = TcpStream::connect(p.addr).await.unwrap();
    for _ in 0..10 {
        assert_eq!(ask(&mut busy, b"PING\r\n").await, "+PONG\r\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed(&mut idle).await, "the idle client stayed open");
    assert_eq!(ask(&mut busy, b"PING\r\n").await, "+PONG\r\n");
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_the_output_limit_is_refused_before_it_is_built() {
    let p = port(ClientConfig {
        output_limit: 64 * 1024,
        ..Default::default()
    })
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let v = vec![b'x'; 40 * 1024];
    assert_eq!(
        ask(&mut s, &bulk_request(&[b"SET", b"k", &v])).await,
        "+OK\r\n"
    );
    assert!(ask(&mut s, b"GET k\r\n").await.starts_with("$40960\r\n"));
    let r = ask(&mut s, b"MGET k k\r\n").await;
    assert!(r.starts_with("-ERR reply too large"), "{r}");
    assert!(
        closed(&mut s).await,
        "a client over the limit is disconnected"
    );
    // Others are unaffected.
    let mut t = TcpStream::connect(p.addr).await.unwrap();
    assert!(ask(&mut t, b"MGET k\r\n")
        .await
        .starts_with("*1\r\n$40960\r\n"));
    // Pipelined replies are written as they are produced, whatever their
    // total: 64 GETs of 40 KiB (2.5 MiB) in one pipeline all arrive.
    let mut pipeline = Vec::new();
    for _ in 0..64 {
        pipeline.extend_from_slice(b"GET k\r\n");
    }
    t.write_all(&pipeline).await.unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let want = 64 * (b"$40960\r\n".len() + 40960 + 2);
    while got < want {
        let n = t.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    assert_eq!(got, want);
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unknown_command_error_is_short_whatever_the_arguments() {
    let p = port(ClientConfig::default()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let huge = vec![b'a'; 4 << 20];
    let r = ask(&mut s, &bulk_request(&[b"NOPE", &huge, b"x"])).await;
    assert!(r.starts_with("-ERR unknown command 'NOPE', with args beginning with: 'aaaa"));
    assert!(r.len() < 400, "a {} byte error", r.len());
    let long_name = vec![b'Z'; 10_000];
    let r = ask(&mut s, &bulk_request(&[&long_name])).await;
    assert!(r.len() < 400, "a {} byte error", r.len());
    assert_eq!(ask(&mut s, b"PING\r\n").await, "+PONG\r\n");
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_pieces_of_any_size_is_one_command() {
    let p = port(ClientConfig::default()).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let v: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let req = bulk_request(&[b"SET", b"pieces", &v]);
    // Odd piece sizes, so every boundary (inside a length line, between
    // CR and LF, inside the body) is crossed.
    for (i, piece) in req.chunks(7919).enumerate() {
        s.write_all(piece).await.unwrap();
        if i % 8 == 0 {
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(reply(&mut s).await, "+OK\r\n");
    let r = ask(&mut s, b"STRLEN pieces\r\n").await;
    assert_eq!(r, ":300000\r\n");
    let got = ask(&mut s, b"GET pieces\r\n").await;
    assert!(got.starts_with("$300000\r\n"));
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_requests_in_flight_and_closes_idle_clients() {
    let p = port(ClientConfig::default()).await;
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(ask(&mut idle, b"PING\r\n").await, "+PONG\r\n");
    let mut busy = TcpStream::connect(p.addr).await.unwrap();
    // A pipeline of writes, then the drain starts while it is answered.
    let mut pipeline = Vec::new();
    for i in 0..2000 {
        pipeline.extend_from_slice(&bulk_request(&[b"SET", format!("d{i}").as_bytes(), b"v"]));
    }
    busy.write_all(&pipeline).await.unwrap();
    // Once the first answers arrive the server is mid-pipeline: stop then.
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while got.len() < 5 {
        let n = busy.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let _ = p.stop.send(true);
    loop {
        let n = busy.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let answered = got.windows(5).filter(|w| w == b"+OK\r\n").count();
    assert!(answered > 0, "nothing answered");
    assert_eq!(
        got.len(),
        answered * 5,
        "every reply sent is whole and +OK: {}",
        String::from_utf8_lossy(&got[..got.len().min(200)])
    );
    assert!(closed(&mut idle).await, "an idle client was left open");
    tokio::time::timeout(Duration::from_secs(30), p.task)
        .await
        .expect("the server did not finish draining")
        .unwrap();
    // What was answered is applied.
    let last = format!("d{}", answered - 1);
    let r = p
        .node
        .read(&raft_kv::command::ReadCmd::Get(last.into_bytes()))
        .await;
    assert_eq!(r, Ok(raft_kv::command::Value::Bulk(b"v".to_vec())));
    p.node.shutdown().await;
}

/// Certificates for the client-port TLS tests, made with the cluster CA
/// helper: the server uses node 1's certificate, the client node 2's.
fn certs(dir: &std::path::Path) {
    raft_net_quic::generate_cluster_certs(dir, &[1, 2]).unwrap();
}

async fn tls_client(
    addr: std::net::SocketAddr,
    dir: &std::path::Path,
    with_cert: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = if with_cert {
        b.with_client_auth_cert(
            vec![CertificateDer::from_pem_file(dir.join("node-2.pem")).unwrap()],
            PrivateKeyDer::from_pem_file(dir.join("node-2.key")).unwrap(),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    let mut s = conn
        .connect(ServerName::try_from("node-1.raft").unwrap(), tcp)
        .await?;
    // With TLS 1.3 a refused client certificate shows on the first read.
    s.write_all(b"PING\r\n").await?;
    let r = reply(&mut s).await;
    if r != "+PONG\r\n" {
        return Err(std::io::Error::other(format!("no PONG: {r:?}")));
    }
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_client_port_with_and_without_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let d = dir.path();
    // Server certificate only.
    let tls =
        raft_kv::server::tls_config(&d.join("node-1.pem"), &d.join("node-1.key"), None).unwrap();
    let p = port(ClientConfig {
        tls: Some(tls),
        ..Default::default()
    })
    .await;
    let mut s = tls_client(p.addr, d, false).await.unwrap();
    assert_eq!(ask(&mut s, b"SET t 1\r\n").await, "+OK\r\n");
    assert_eq!(ask(&mut s, b"GET t\r\n").await, "$1\r\n1\r\n");
    // Plain text on a TLS port gets nothing.
    let mut plain = TcpStream::connect(p.addr).await.unwrap();
    plain.write_all(b"PING\r\n").await.unwrap();
    assert!(closed(&mut plain).await);
    let _ = p.stop.send(true);
    p.node.shutdown().await;
    // Client certificates required.
    let tls = raft_kv::server::tls_config(
        &d.join("node-1.pem"),
        &d.join("node-1.key"),
        Some(&d.join("ca.pem")),
    )
    .unwrap();
    let p = port(ClientConfig {
        tls: Some(tls),
        ..Default::default()
    })
    .await;
    assert!(
        tls_client(p.addr, d, false).await.is_err(),
        "a client without a certificate was served"
    );
    let mut s = tls_client(p.addr, d, true).await.unwrap();
    assert_eq!(ask(&mut s, b"PING\r\n").await, "+PONG\r\n");
    let _ = p.stop.send(true);
    p.node.shutdown().await;
    // Bad files are named.
    let e =
        raft_kv::server::tls_config(&d.join("nope.pem"), &d.join("node-1.key"), None).unwrap_err();
    assert!(e.contains("nope.pem"), "{e}");
    let e = raft_kv::server::tls_config(&d.join("node-1.key"), &d.join("node-1.key"), None)
        .unwrap_err();
    assert!(e.contains("no certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_replies_is_disconnected() {
    let p = port(ClientConfig {
        write_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let v = vec![b'x'; 1 << 20];
    assert_eq!(
        ask(&mut s, &bulk_request(&[b"SET", b"k", &v])).await,
        "+OK\r\n"
    );
    // 64 MiB of replies asked for, none read: the socket buffers fill and
    // the server's writes stall.
    let mut pipeline = Vec::new();
    for _ in 0..64 {
        pipeline.extend_from_slice(b"GET k\r\n");
    }
    s.write_all(&pipeline).await.unwrap();
    let gauge = |p: &Port| {
        let text = p.node.metrics().render(&p.node);
        text.lines()
            .find(|l| l.starts_with("raftkv_client_connections "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<i64>().ok())
    };
    assert_eq!(gauge(&p), Some(1));
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while gauge(&p) != Some(0) {
        assert!(
            tokio::time::Instant::now() < end,
            "a client that reads nothing kept its connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_client_gets_a_short_deadline() {
    let p = port(ClientConfig {
        password: Some("pw".into()),
        auth_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut lurker = TcpStream::connect(p.addr).await.unwrap();
    assert!(ask(&mut lurker, b"PING\r\n").await.starts_with("-NOAUTH"));
    let mut user = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(ask(&mut user, b"AUTH pw\r\n").await, "+OK\r\n");
    assert!(
        closed(&mut lurker).await,
        "the unauthenticated client stayed"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask(&mut user, b"PING\r\n").await, "+PONG\r\n");
    let _ = p.stop.send(true);
    p.node.shutdown().await;
}
