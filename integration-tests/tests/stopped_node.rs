//! A node whose disk fills does not go on looking healthy: Raft stops, INFO
//! says so and why, and every command answers an error. (Needs root: it
//! mounts a small tmpfs to fill.)

use raft_kv::command::{SetCond, WriteCmd};
use raft_kv::node::{LogEngine, NodeConfig};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn free_tcp() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn free_udp() -> SocketAddr {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap()
}

/// Sends one command and reads one reply line (enough for these replies).
fn ask(addr: SocketAddr, args: &[&str]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The runtime is built by hand so that leaving the test never waits for a
/// blocking task stuck on the full disk.
#[test]
fn a_node_with_a_full_disk_says_so_to_every_command() {
    on_a_full_disk(LogEngine::Sled);
}

/// The same with the segment-file log.
#[test]
fn a_node_with_a_full_disk_says_so_to_every_command_on_the_segment_log() {
    on_a_full_disk(LogEngine::Wal);
}

fn on_a_full_disk(engine: LogEngine) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(full_disk(engine));
    rt.shutdown_timeout(Duration::from_secs(1));
}

async fn full_disk(log_engine: LogEngine) {
    let dir = tempfile::tempdir().unwrap();
    raft_net_quic::generate_cluster_certs(dir.path().join("certs"), &[1]).unwrap();
    let data = dir.path().join("data");
    let _fs = integration_tests::tmpfs::Tmpfs::mount(&data, "16m");
    let client_addr = free_tcp();
    let cfg = NodeConfig {
        raft_addr: free_udp(),
        client_addr,
        peers: BTreeMap::new(),
        data_dir: data.clone(),
        snapshot_threshold: 0,
        tls_dir: dir.path().join("certs"),
        password: None,
        cluster_id: 0,
        join: None,
        log_engine,
        flush_every: raft_kv::node::DEFAULT_FLUSH_EVERY,
        raft: raft_core::Config::new(1),
    };
    let (node, server) = raft_kv::cli::run_node(cfg).await.unwrap();
    assert!(ask(client_addr, &["PING"]).starts_with("+PONG"));
    let end = Instant::now() + Duration::from_secs(60);
    let mut i = 0u32;
    while node.stopped().is_none() {
        assert!(Instant::now() < end, "the node never noticed its full disk");
        i += 1;
        let _ = node
            .write(vec![WriteCmd::Set {
                key: format!("k{}", i % 32).into_bytes(),
                value: vec![b'x'; 1 << 20],
                cond: SetCond::Always,
            }])
            .await;
    }
    let why = node.stopped().unwrap_or_default().to_lowercase();
    // A full disk is reported as such, or (if sled hangs instead of
    // failing) as a stalled write.
    assert!(why.contains("space") || why.contains("stalled"), "{why}");
    let info = node.info();
    assert!(info.contains("role:stopped"), "{info}");
    assert!(info.contains("stopped_reason:"), "{info}");
    for cmd in [
        vec!["PING"],
        vec!["GET", "k1"],
        vec!["SET", "a", "b"],
        vec!["DBSIZE"],
    ] {
        let reply = ask(client_addr, &cmd);
        assert!(
            reply.starts_with("-ERR this node has stopped"),
            "{cmd:?}: {reply}"
        );
    }
    let info = ask(client_addr, &["INFO"]);
    assert!(info.contains("role:stopped"), "{info}");
    // Shutdown is bounded even though the disk is full.
    server.abort();
    let t0 = Instant::now();
    node.shutdown().await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}
