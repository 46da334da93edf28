//! Bounded memory: back-pressure from slow applications and slow disks, oversized commands.

use super::*;

fn small_limits(id: NodeId, ids: &[NodeId]) -> Config {
    let mut c = config(id, ids);
    c.max_entry_bytes = 64 << 10;
    c.max_unapplied_bytes = 1 << 20;
    c
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An application that stops reading the apply channel: the node refuses
/// new proposals with `Busy` instead of queueing without bound, memory stays
/// flat while clients keep trying, and everything flows again once the
/// application reads.
#[tokio::test(start_paused = true)]
async fn application_that_stops_reading_gets_busy_not_unbounded_memory() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(4);
    let raft = Raft::new(small_limits(1, &[1]), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    let cmd = vec![7u8; 60 << 10];
    let mut accepted = 0u64;
    let mut busy = 0u64;
    let rss_before = rss_bytes();
    // 16k attempts of 60 KiB: about 1 GiB offered.
    for _ in 0..16_384 {
        match raft.submit(cmd.clone()).await {
            Ok(_) => accepted += 1,
            Err(Error::Busy { pending, max }) => {
                assert!(pending <= max, "{pending} > {max}");
                busy += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    let st = raft.status();
    let rss_after = rss_bytes();
    println!(
        "accepted {accepted}, busy {busy}, unapplied {} bytes, rss {:?} -> {:?}",
        st.unapplied_bytes, rss_before, rss_after
    );
    assert!(
        busy > 16_000,
        "the node kept accepting: {accepted} accepted"
    );
    assert!(st.unapplied_bytes <= 1 << 20);
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        // The margin covers other tests running in this process.
        assert!(
            b.saturating_sub(a) < 256 << 20,
            "memory grew by {} bytes",
            b - a
        );
    }
    // The application reads again: every accepted entry arrives, and
    // proposals are accepted again.
    let mut got = 0u64;
    while got < accepted {
        let m = timeout(secs(5), rx.recv()).await.unwrap().unwrap();
        if m.command_valid {
            got += 1;
        }
    }
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let mut ok = false;
    for _ in 0..100 {
        if raft.submit_and_wait(cmd.clone()).await.is_ok() {
            ok = true;
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "proposals accepted again once the application reads");
    raft.shutdown().await.unwrap();
}

/// Followers whose disks are slow: the leader's uncommitted entries are
/// bounded; it answers `Busy` and commits what it accepted.
#[tokio::test(start_paused = true)]
async fn slow_follower_disks_bound_the_leaders_uncommitted_entries() {
    let ids = [1u64, 2, 3];
    let net = ChannelNetwork::new();
    let stores: Vec<MemLogStore> = ids.iter().map(|_| MemLogStore::new()).collect();
    let mut nodes = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(100);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = Raft::new(small_limits(id, &ids), stores[i].reopen(), net.join(id), tx).unwrap();
        r.start().await.unwrap();
        nodes.push(r);
    }
    wait_until("leader", || nodes.iter().any(|r| r.is_leader())).await;
    let li = nodes.iter().position(|r| r.is_leader()).unwrap_or(0);
    for (i, s) in stores.iter().enumerate() {
        if i != li {
            // Slow, but below the election timeout: a disk slower than that
            // keeps any cluster from holding a leader.
            s.set_write_delay(Duration::from_millis(100));
        }
    }
    let cmd = vec![1u8; 60 << 10];
    let (mut accepted, mut busy, mut max_seen) = (Vec::new(), 0, 0);
    let rss_before = rss_bytes();
    // 16k attempts of 60 KiB: about 1 GiB offered.
    for _ in 0..16_384 {
        match nodes[li].propose(vec![cmd.clone()]).await {
            Ok(ps) => accepted.extend(ps),
            Err(Error::Busy { .. }) => busy += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
        max_seen = max_seen.max(nodes[li].status().unapplied_bytes);
    }
    let rss_after = rss_bytes();
    println!(
        "accepted {}, busy {busy}, most unapplied bytes seen {max_seen}, rss {rss_before:?} -> {rss_after:?}",
        accepted.len()
    );
    assert!(busy > 16_000, "a leader with slow followers kept accepting");
    assert!(max_seen <= 1 << 20, "{max_seen}");
    // About 1 GiB was offered; memory must not follow (the margin covers
    // other tests running in this process).
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        assert!(
            b.saturating_sub(a) < 256 << 20,
            "memory grew by {} bytes",
            b - a
        );
    }
    for p in accepted {
        p.committed().await.unwrap();
    }
    for r in &nodes {
        r.shutdown().await.unwrap();
    }
}

/// Commands larger than `max_entry_bytes` are refused before anything is
/// proposed; a batch is all or nothing.
#[tokio::test(start_paused = true)]
async fn oversized_commands_are_refused_with_a_typed_error() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(16);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let raft = Raft::new(small_limits(1, &[1]), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    wait_until("leader", || raft.is_leader()).await;
    let max = raft.max_command_bytes();
    assert_eq!(max, 64 << 10);
    raft.submit_and_wait(vec![0; max]).await.unwrap();
    assert_eq!(
        raft.submit(vec![0; max + 1]).await,
        Err(Error::TooLarge { size: max + 1, max })
    );
    let before = raft.status().last_log_index;
    let res = raft.submit_batch(vec![vec![1; 10], vec![0; max + 1]]).await;
    assert!(matches!(res, Err(Error::TooLarge { .. })), "{res:?}");
    assert_eq!(raft.status().last_log_index, before, "nothing was proposed");
    raft.shutdown().await.unwrap();
}
