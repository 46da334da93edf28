//! Durability and delivery: what a crash keeps, acknowledgements only after saves, the apply channel in order, purging and restarts.

use super::*;

#[tokio::test(start_paused = true)]
async fn restarted_node_recovers_from_its_store_without_reapplying() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    let l = c.wait_leader(&all, secs(2)).await.unwrap();
    let i = c.write(&all, "a", secs(2)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(2)).await);
    let f = all.into_iter().find(|&x| x != l).unwrap();
    c.kill(f).await;
    let durable = c.stores[&f].durable();
    assert!(durable.entries.len() as u64 >= i && durable.hard_state.term >= 1);
    c.write(&all, "b", secs(2)).await.unwrap();
    c.start(f).await;
    let j = c.write(&all, "c", secs(2)).await.unwrap();
    assert!(c.wait_applied(&[f], j, secs(3)).await);
    assert_eq!(
        c.commands(f),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    let idx = c.applied_indexes(f);
    let uniq: BTreeSet<LogIndex> = idx.iter().copied().collect();
    assert_eq!(
        uniq.len(),
        idx.len(),
        "no entry applied twice across the restart"
    );
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn slow_disk_crash_loses_only_unacknowledged_writes() {
    let net = ChannelNetwork::new();
    let ids = [1u64, 2, 3];
    let stores: Vec<MemLogStore> = ids
        .iter()
        .map(|_| MemLogStore::new().with_write_delay(Duration::from_millis(5)))
        .collect();
    let mut rafts = Vec::new();
    for (k, &id) in ids.iter().enumerate() {
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let r = Raft::new(config(id, &ids), stores[k].clone(), net.join(id), tx).unwrap();
        r.start().await.unwrap();
        rafts.push(r);
    }
    let mut acked = Vec::new();
    let end = Instant::now() + secs(3);
    while acked.len() < 10 && Instant::now() < end {
        for r in &rafts {
            if let Ok(i) = r
                .submit_and_wait(format!("w{}", acked.len()).into_bytes())
                .await
            {
                acked.push(i);
            }
        }
        sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(acked.len(), 10);
    for r in &rafts {
        r.shutdown().await.unwrap();
    }
    // Every acknowledged write is durable on a majority of the disks.
    for i in acked {
        let holders = stores
            .iter()
            .filter(|s| s.durable().entries.iter().any(|e| e.index == i))
            .count();
        assert!(
            holders >= 2,
            "acknowledged entry {i} is durable on only {holders} node(s)"
        );
    }
}

/// Committed entries go onto the apply channel directly while it has room,
/// and through the applier task (which waits for room, in order) when it is
/// full. `applied_index` counts exactly what the channel accepted, and every
/// index arrives once, in order, across both paths.
#[tokio::test(start_paused = true)]
async fn apply_channel_gets_every_entry_once_in_order_whether_it_has_room_or_not() {
    let net = ChannelNetwork::new();
    let (tx, mut rx) = mpsc::channel::<ApplyMsg>(4);
    let raft = Raft::new(Config::new(1), MemLogStore::new(), net.join(1), tx).unwrap();
    raft.start().await.unwrap();
    let mut st = raft.watch_status();
    timeout(secs(2), st.wait_for(|s| s.role == Role::Leader))
        .await
        .expect("leads")
        .expect("running");
    // Room: the no-op (index 1) and one command are accepted at once, with
    // nobody reading the channel yet.
    let (i, _) = raft.submit(b"a".to_vec()).await.unwrap();
    assert_eq!(i, 2);
    wait_until("entry 2 is accepted", || raft.status().applied_index == 2).await;
    // No room for a batch of 5 (2 slots left): the applier takes it and the
    // channel accepts only what fits; a later single entry must queue behind it.
    let ids = raft.submit_batch(vec![b"b".to_vec(); 5]).await.unwrap();
    assert_eq!(ids.last().unwrap().0, 7);
    let (last, _) = raft.submit(b"c".to_vec()).await.unwrap();
    assert_eq!(last, 8);
    wait_until("the channel is full", || raft.status().applied_index == 4).await;
    sleep(Duration::from_millis(50)).await;
    assert_eq!(
        raft.status().applied_index,
        4,
        "applied_index must not count what the full channel has not accepted"
    );
    // A slow reader drains it; later writes alternate between the two paths.
    let received = Arc::new(StdMutex::new(Vec::<LogIndex>::new()));
    let r2 = received.clone();
    let consumer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            r2.lock().unwrap().push(m.command_index);
            sleep(Duration::from_micros(200)).await;
        }
    });
    let mut last = last;
    for round in 0..30u8 {
        let n = 1 + usize::from(round % 6);
        let ids = raft.submit_batch(vec![vec![round]; n]).await.unwrap();
        last = ids.last().unwrap().0;
        if round % 3 == 0 {
            sleep(Duration::from_micros(700)).await;
        }
    }
    wait_until("every entry is delivered", || {
        received.lock().unwrap().last() == Some(&last)
    })
    .await;
    assert_eq!(
        *received.lock().unwrap(),
        (1..=last).collect::<Vec<_>>(),
        "each index once, in order"
    );
    assert_eq!(raft.status().applied_index, last);
    raft.shutdown().await.unwrap();
    consumer.abort();
}

/// Entries the application released are purged from every store once all
/// members hold them; a node restarted from a purged store resumes after the
/// compaction point without re-applying anything, and replication goes on.
#[tokio::test(start_paused = true)]
async fn released_entries_are_purged_and_restarts_resume_after_the_compaction_point() {
    let mut c = TestCluster::new(3).await;
    c.compact_threshold = Some(10);
    for id in [1, 2, 3] {
        c.kill(id).await;
        c.start(id).await;
    }
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.expect("a leader");
    for i in 0..40 {
        c.write(&[l], &format!("a{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    // Nothing released yet: every store still holds the whole log.
    sleep(Duration::from_millis(500)).await;
    for id in [1, 2, 3] {
        let st = c.stores[&id].reopen().load().await.unwrap();
        assert_eq!(st.purged.index, 0, "node {id} purged unreleased entries");
    }
    for id in [1, 2, 3] {
        let applied = c.applied_indexes(id).last().copied().unwrap();
        c.raft(id).release_applied(applied).await.unwrap();
    }
    // Followers learn that every member holds the entries from heartbeats.
    sleep(Duration::from_millis(500)).await;
    for id in [1, 2, 3] {
        let st = c.stores[&id].reopen().load().await.unwrap();
        assert!(
            st.purged.index >= last - 10 && st.purged.index <= last,
            "node {id}: compaction point {:?}, last {last}",
            st.purged
        );
        if let Some(first) = st.entries.first() {
            assert_eq!(
                first.index,
                st.purged.index + 1,
                "node {id}: the store keeps what follows the point"
            );
        }
    }
    let follower = [1, 2, 3].into_iter().find(|&id| id != l).unwrap();
    c.kill(follower).await;
    c.start(follower).await;
    for i in 0..5 {
        c.write(&[l], &format!("b{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    for id in [1, 2, 3] {
        let idx = c.applied_indexes(id);
        assert_eq!(
            idx,
            (1..=last).collect::<Vec<_>>(),
            "node {id} applies each index once, in order"
        );
        assert!(c.commands(id).ends_with(&[b"b4".to_vec()]));
    }
    c.shutdown_all().await;
}

// ----- durability, back-pressure, start-up -----------------------------------

/// Three nodes on slow disks; reports every broken durability rule seen:
/// a leader whose votes are not durable on a majority when it is elected, and
/// an entry reported committed that is not durable on a majority. Followers
/// crash in the middle of writes along the way (a stopped node loses the
/// write in flight).
async fn durability_violations() -> Vec<String> {
    let ids = [1u64, 2, 3];
    let net = ChannelNetwork::new();
    let stores: BTreeMap<NodeId, MemLogStore> = ids
        .iter()
        .map(|&id| {
            (
                id,
                MemLogStore::new().with_write_delay(Duration::from_millis(40)),
            )
        })
        .collect();
    let mut nodes: BTreeMap<NodeId, Raft> = BTreeMap::new();
    let start = |id: NodeId, nodes: &mut BTreeMap<NodeId, Raft>| {
        let (tx, mut rx) = mpsc::channel::<ApplyMsg>(1000);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let raft = Raft::new(config(id, &ids), stores[&id].reopen(), net.join(id), tx).unwrap();
        nodes.insert(id, raft);
    };
    for id in ids {
        start(id, &mut nodes);
        nodes[&id].start().await.unwrap();
    }
    let mut problems = Vec::new();
    let votes_ok = |leader: NodeId, term: Term| {
        let n = stores
            .values()
            .filter(|s| {
                let hs = s.durable().hard_state;
                hs.term > term || (hs.term == term && hs.vote == Some(leader))
            })
            .count();
        n >= 2
    };
    let mut seen_terms = BTreeSet::new();
    for round in 0..6u64 {
        // Wait for a leader and check its votes at once.
        let deadline = Instant::now() + secs(5);
        let leader = loop {
            let l = nodes
                .iter()
                .find(|(_, r)| r.is_leader())
                .map(|(&id, r)| (id, r.status().term));
            if let Some(l) = l {
                break Some(l);
            }
            if Instant::now() > deadline {
                break None;
            }
            sleep(Duration::from_millis(1)).await;
        };
        let Some((leader, term)) = leader else {
            problems.push(format!("round {round}: no leader"));
            break;
        };
        if seen_terms.insert(term) && !votes_ok(leader, term) {
            problems.push(format!(
                "node {leader} leads term {term} before a majority stored its vote"
            ));
        }
        // The leader's disk is fast, the followers' slow: only the
        // followers' acknowledgements decide when an entry commits.
        for (&id, s) in &stores {
            s.set_write_delay(if id == leader {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(200)
            });
        }
        for i in 0..3 {
            let cmd = format!("r{round}-{i}").into_bytes();
            match nodes[&leader].propose(vec![cmd]).await {
                Ok(mut ps) => {
                    let p = ps.pop().unwrap();
                    let (index, t) = (p.index, p.term);
                    if p.committed().await.is_ok() {
                        let holders = stores
                            .values()
                            .filter(|s| {
                                s.durable()
                                    .entries
                                    .iter()
                                    .any(|e| e.index == index && e.term == t)
                            })
                            .count();
                        if holders < 2 {
                            problems.push(format!(
                                "entry {index} of term {t} reported committed while durable on {holders} of 3 disks"
                            ));
                        }
                    }
                }
                Err(_) => break,
            }
        }
        // A follower crashes in the middle of a write, and the leader is
        // restarted to force an election among slow disks.
        let follower = ids.iter().copied().find(|&id| id != leader).unwrap_or(1);
        let _ = nodes[&leader].submit(b"in flight".to_vec()).await;
        sleep(Duration::from_millis(20)).await;
        for id in [follower, leader] {
            let _ = nodes[&id].shutdown().await;
            start(id, &mut nodes);
            nodes[&id].start().await.unwrap();
        }
        for s in stores.values() {
            s.set_write_delay(Duration::from_millis(40));
        }
    }
    for r in nodes.values() {
        let _ = r.shutdown().await;
    }
    problems
}

/// Acknowledgements and votes leave only after the write they promise is
/// durable. The same scenario with the driver changed to send them before
/// `save` returns must be caught.
#[tokio::test(start_paused = true)]
async fn acks_and_votes_leave_only_after_their_save_returns() {
    let problems = durability_violations().await;
    assert!(problems.is_empty(), "{problems:#?}");
    let broken = {
        let _m = crate::mutation::inject(crate::mutation::Mutation::DriverSendsBeforeSave);
        durability_violations().await
    };
    println!("with acks and votes sent before save: {broken:#?}");
    assert!(
        !broken.is_empty(),
        "sending before save returns went unnoticed"
    );
}
