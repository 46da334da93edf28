//! Starting, stopping and failing: clear errors, bounded shutdown, stored membership, stalled disks.

use super::*;

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_no_task_running() {
    let mut c = TestCluster::new(3).await;
    c.wait_leader(&[1, 2, 3], secs(2)).await.unwrap();
    c.write(&[1, 2, 3], "x", secs(2)).await.unwrap();
    let handles: Vec<Raft> = c.nodes.values().map(|n| n.raft.clone()).collect();
    c.shutdown_all().await;
    tokio::task::yield_now().await;
    let alive = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert_eq!(alive, 0, "tasks still running after shutdown");
    for r in handles {
        assert!(r.status().stopped.is_some());
        assert!(matches!(
            r.submit(b"late".to_vec()).await,
            Err(Error::Stopped(_))
        ));
    }
}

#[tokio::test(start_paused = true)]
async fn closed_apply_channel_stops_the_node_with_a_clear_error() {
    let net = ChannelNetwork::new();
    let (tx, rx) = mpsc::channel(1);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    drop(rx);
    // A single node elects itself and commits its no-op, which cannot be delivered.
    let mut st = raft.watch_status();
    let stopped = timeout(secs(2), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "the node should stop");
    let why = raft.status().stopped.unwrap();
    assert!(why.contains("apply channel"), "{why}");
    assert!(matches!(
        raft.submit(b"x".to_vec()).await,
        Err(Error::Stopped(_))
    ));
    assert_eq!(raft.shutdown().await, Err(Error::ApplyChannelClosed));
}

#[tokio::test(start_paused = true)]
async fn failing_disk_stops_the_node_with_a_storage_error() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let store = MemLogStore::new();
    let disk = store.clone();
    let raft = Raft::new(Config::new(1), store, net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    disk.set_fail_writes(true);
    let mut st = raft.watch_status();
    // Reduce to a bool at once: the returned guard holds the status lock.
    let stopped = timeout(secs(2), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "node stops");
    assert!(matches!(
        raft.shutdown().await,
        Err(Error::Storage(StorageError::Io(_)))
    ));
}

#[tokio::test(start_paused = true)]
async fn lifecycle_errors_are_reported() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let mut bad = Config::new(1);
    bad.election_timeout_max = bad.election_timeout_min;
    assert!(matches!(
        Raft::new(bad, MemLogStore::new(), net.join(1), tx.clone()),
        Err(Error::Config(_))
    ));
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    assert_eq!(raft.submit(b"x".to_vec()).await, Err(Error::NotStarted));
    raft.start().await.unwrap();
    assert_eq!(raft.start().await, Err(Error::AlreadyStarted));
    raft.shutdown().await.unwrap();
}

/// A start refused for bad durable state leaves the node startable: a
/// corrected retry runs it.
#[tokio::test(start_paused = true)]
async fn a_refused_start_can_be_retried() {
    let net = ChannelNetwork::new();
    let (tx, _rx) = mpsc::channel(16);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    let err = raft.start_with_applied(100).await.unwrap_err();
    assert!(matches!(err, Error::Restore(_)), "{err}");
    assert_eq!(raft.status().stopped, None);
    raft.start_with_applied(0).await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    raft.submit_and_wait(b"x".to_vec()).await.unwrap();
    assert_eq!(raft.start().await, Err(Error::AlreadyStarted));
    raft.shutdown().await.unwrap();
}

/// The members are stored at the first start; a restart with other peers
/// (none, or a phantom one) is refused with both sets named, and a restart
/// with the stored ones works.
#[tokio::test(start_paused = true)]
async fn stored_membership_counts_and_other_peers_only_bootstrap() {
    let net = ChannelNetwork::new();
    let disk = MemLogStore::new();
    let run = |cfg: Config| {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        Raft::new(cfg, disk.reopen(), net.join(2), tx).unwrap()
    };
    let r = run(config(2, &[1, 2, 3]));
    r.start().await.unwrap();
    r.shutdown().await.unwrap();
    assert_eq!(
        disk.durable().membership,
        Some(Membership::new([1, 2, 3])),
        "bootstrapped once, durably"
    );
    for wrong in [vec![2u64], vec![1, 2, 3, 4], vec![1, 2]] {
        // The peers given at start only bootstrap: a restart naming others
        // runs with the stored membership and stores nothing new.
        let r = run(config(2, &wrong));
        r.start().await.unwrap();
        assert_eq!(
            r.status().membership,
            Membership::new([1, 2, 3]),
            "started with {wrong:?}"
        );
        r.shutdown().await.unwrap();
        assert_eq!(disk.durable().membership, Some(Membership::new([1, 2, 3])));
    }
    let r = run(config(2, &[1, 2, 3]));
    r.start().await.unwrap();
    r.shutdown().await.unwrap();
}

/// A disk that stops answering must not hang shutdown.
#[tokio::test(start_paused = true)]
async fn shutdown_is_bounded_when_the_disk_hangs() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let disk = MemLogStore::new();
    let raft = Raft::new(Config::new(1), disk.reopen(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    disk.set_write_delay(Duration::from_secs(24 * 3600));
    let r = raft.clone();
    tokio::spawn(async move {
        let _ = r.submit(b"stuck".to_vec()).await;
    });
    sleep(Duration::from_millis(10)).await;
    let t0 = Instant::now();
    let res = raft.shutdown().await;
    let took = t0.elapsed();
    // The driver never waits for the disk itself; the stuck write is abandoned.
    assert_eq!(res, Ok(()));
    assert!(took <= SHUTDOWN_GRACE, "{took:?}");
}

/// A leader whose disk hangs cannot apply anything; it must not stay leader
/// looking healthy. The node stops with a storage error after
/// `max_write_stall`, and the others elect a new leader.
#[tokio::test(start_paused = true)]
async fn a_stalled_disk_stops_the_node_and_the_others_take_over() {
    let c = TestCluster::new(3).await;
    let leader = c.wait_leader(&[1, 2, 3], secs(5)).await.expect("a leader");
    c.stores[&leader].set_write_delay(Duration::from_secs(24 * 3600));
    let r = c.nodes[&leader].raft.clone();
    tokio::spawn(async move {
        let _ = r.submit(b"stuck".to_vec()).await;
    });
    let mut st = c.nodes[&leader].raft.watch_status();
    let stopped = timeout(secs(10), st.wait_for(|s| s.stopped.is_some()))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(stopped, "the node with the stalled disk stops");
    let why = c.nodes[&leader].raft.status().stopped.unwrap_or_default();
    assert!(why.contains("stalled"), "{why}");
    let others: Vec<NodeId> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let next = c.wait_leader(&others, secs(5)).await;
    assert!(next.is_some_and(|n| n != leader), "{next:?}");
}
