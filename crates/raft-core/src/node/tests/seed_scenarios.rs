//! The seed's scenarios: elections, failover within two election timeouts, majority and minority partitions, clusters of 3, 5 and 7, lossy networks.

use super::*;

#[tokio::test(start_paused = true)]
async fn three_nodes_elect_replicate_and_apply_in_order() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.expect("a leader");
    for i in 0..20 {
        c.write(&[l], &format!("cmd{i}"), secs(2)).await.unwrap();
    }
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&[1, 2, 3], last, secs(2)).await);
    let want: Vec<Vec<u8>> = (0..20).map(|i| format!("cmd{i}").into_bytes()).collect();
    for id in [1, 2, 3] {
        assert_eq!(c.commands(id), want, "node {id}");
        let idx = c.applied_indexes(id);
        assert_eq!(
            idx,
            (1..=idx.len() as u64).collect::<Vec<_>>(),
            "node {id} applies each index once, in order"
        );
    }
    c.shutdown_all().await;
}

async fn leader_failover(n: u64) {
    let mut c = TestCluster::new(n).await;
    let all: Vec<NodeId> = (1..=n).collect();
    let old = c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    let killed_at = Instant::now();
    c.kill(old).await;
    let rest: Vec<NodeId> = all.iter().copied().filter(|&x| x != old).collect();
    let new = c.wait_leader(&rest, secs(5)).await.expect("a new leader");
    let took = killed_at.elapsed();
    println!("{n} nodes: leader {old} killed, node {new} leads after {took:?} (virtual time)");
    assert_ne!(new, old);
    assert!(
        took <= 2 * ELECTION_MAX,
        "{n} nodes: new leader after {took:?}, more than two election timeouts"
    );
    c.write(&rest, "after", secs(2))
        .await
        .expect("writes resume");
    let last = c.raft(new).status().commit_index;
    assert!(c.wait_applied(&rest, last, secs(2)).await);
    for id in &rest {
        assert_eq!(c.commands(*id), vec![b"before".to_vec(), b"after".to_vec()]);
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn leader_killed_is_replaced_within_two_election_timeouts_3_nodes() {
    leader_failover(3).await;
}

#[tokio::test(start_paused = true)]
async fn leader_killed_is_replaced_within_two_election_timeouts_5_nodes() {
    leader_failover(5).await;
}

#[tokio::test(start_paused = true)]
async fn seven_nodes_elect_and_commit() {
    let mut c = TestCluster::new(7).await;
    let all: Vec<NodeId> = (1..=7).collect();
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    let i = c.write(&all, "seven", secs(2)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(2)).await);
    c.shutdown_all().await;
}

async fn majority_keeps_serving(n: u64, majority: &[NodeId], minority: &[NodeId]) {
    let mut c = TestCluster::new(n).await;
    let all: Vec<NodeId> = (1..=n).collect();
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    c.net.partition(&[majority, minority]);
    // Let in-flight messages land and a minority leader (if any) step down.
    sleep(ELECTION_MAX).await;
    let frozen: BTreeMap<NodeId, (LogIndex, Term)> = minority
        .iter()
        .map(|&id| {
            let s = c.raft(id).status();
            (id, (s.commit_index, s.term))
        })
        .collect();
    let mut watchers = Vec::new();
    for &id in minority {
        let mut rx = c.raft(id).watch_status();
        watchers.push(tokio::spawn(async move {
            let mut led = false;
            while rx.changed().await.is_ok() {
                led |= rx.borrow().role == Role::Leader;
            }
            led
        }));
    }
    for i in 0..10 {
        c.write(majority, &format!("during{i}"), secs(3))
            .await
            .expect("the majority keeps committing");
    }
    sleep(secs(2)).await;
    for &id in minority {
        let s = c.raft(id).status();
        assert_ne!(s.role, Role::Leader, "minority node {id} must not lead");
        assert_eq!(
            s.commit_index, frozen[&id].0,
            "minority node {id} must commit nothing"
        );
        assert!(!c.commands(id).iter().any(|x| x.starts_with(b"during")));
    }
    c.net.heal();
    let i = c.write(&all, "healed", secs(3)).await.unwrap();
    assert!(
        c.wait_applied(&all, i, secs(3)).await,
        "minority catches up after healing"
    );
    c.shutdown_all().await;
    for w in watchers {
        assert!(
            !w.await.unwrap(),
            "a minority node became leader during the partition"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn partition_majority_serves_minority_never_leads_3_nodes() {
    majority_keeps_serving(3, &[1, 2], &[3]).await;
}

#[tokio::test(start_paused = true)]
async fn partition_majority_serves_minority_never_leads_5_nodes() {
    majority_keeps_serving(5, &[1, 2, 3], &[4, 5]).await;
}

#[tokio::test(start_paused = true)]
async fn no_majority_no_service_then_service_after_healing() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&all, "before", secs(2)).await.unwrap();
    let commit_before: Vec<LogIndex> = all
        .iter()
        .map(|&id| c.raft(id).status().commit_index)
        .collect();
    c.net.partition(&[&[1], &[2], &[3]]);
    sleep(ELECTION_MAX).await;
    let res = c.write(&all, "lonely", secs(3)).await;
    assert!(
        res.is_err(),
        "no write may commit without a majority: {res:?}"
    );
    assert_eq!(c.current_leader(&all), None, "no leader without a majority");
    for (k, &id) in all.iter().enumerate() {
        assert!(c.raft(id).status().commit_index <= commit_before[k] + 1);
    }
    c.net.heal();
    let l = c
        .wait_leader(&all, secs(3))
        .await
        .expect("a leader after healing");
    let i = c.write(&[l], "healed", secs(3)).await.unwrap();
    assert!(c.wait_applied(&all, i, secs(3)).await);
    for id in all {
        assert!(
            !c.commands(id).contains(&b"lonely".to_vec()),
            "an unacknowledged write never applies"
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn old_leader_rejoins_steps_down_and_its_uncommitted_entries_are_replaced() {
    let mut c = TestCluster::new(3).await;
    let all = [1, 2, 3];
    let old = c.wait_leader(&all, secs(2)).await.expect("a leader");
    c.write(&[old], "committed", secs(2)).await.unwrap();
    c.net.isolate(old);
    let doomed = c.raft(old).propose(vec![b"doomed".to_vec()]).await.unwrap();
    let doomed = doomed.into_iter().next().unwrap();
    let (idx, term) = (doomed.index, doomed.term);
    let rest: Vec<NodeId> = all.iter().copied().filter(|&x| x != old).collect();
    let new = c
        .wait_leader(&rest, secs(3))
        .await
        .expect("majority elects");
    for i in 0..3 {
        c.write(&[new], &format!("new{i}"), secs(2)).await.unwrap();
    }
    let waiter = tokio::spawn(doomed.committed());
    c.net.heal();
    let last = c.raft(new).status().commit_index;
    assert!(
        c.wait_applied(&all, last, secs(3)).await,
        "old leader catches up"
    );
    assert_ne!(c.raft(old).status().role, Role::Leader);
    assert_eq!(
        waiter.await.unwrap(),
        Err(Error::Overwritten { index: idx, term })
    );
    for id in all {
        assert_eq!(
            c.commands(id),
            vec![
                b"committed".to_vec(),
                b"new0".to_vec(),
                b"new1".to_vec(),
                b"new2".to_vec()
            ]
        );
    }
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn follower_refuses_writes_with_a_leader_hint_and_reads_are_linearizable_on_the_leader() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(2)).await.unwrap();
    let i = c.write(&[l], "x", secs(2)).await.unwrap();
    assert!(c.wait_applied(&[1, 2, 3], i, secs(2)).await);
    let f = [1, 2, 3].into_iter().find(|&x| x != l).unwrap();
    assert_eq!(
        c.raft(f).submit(b"y".to_vec()).await,
        Err(Error::NotLeader { leader: Some(l) })
    );
    assert_eq!(c.raft(f).leader(), Some(l));
    assert_eq!(
        c.raft(f).read_index().await,
        Err(Error::NotLeader { leader: Some(l) })
    );
    let r = c.raft(l).read_index().await.unwrap();
    assert!(
        r >= i,
        "read index {r} must cover the acknowledged write at {i}"
    );
    // A leader cut off from the majority cannot confirm a read.
    c.net.isolate(l);
    let res = timeout(secs(2), c.raft(l).read_index()).await;
    assert!(
        !matches!(res, Ok(Ok(_))),
        "an isolated leader must not serve a read: {res:?}"
    );
    c.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn cluster_survives_lossy_slow_network() {
    let mut c = TestCluster::new(5).await;
    c.net.set_drop_per_mille(100);
    c.net
        .set_delay(Duration::from_millis(1), Duration::from_millis(20));
    let all: Vec<NodeId> = (1..=5).collect();
    for i in 0..20 {
        c.write(&all, &format!("lossy{i}"), secs(10)).await.unwrap();
    }
    c.net.set_drop_per_mille(0);
    let l = c.wait_leader(&all, secs(3)).await.unwrap();
    let last = c.raft(l).status().commit_index;
    assert!(c.wait_applied(&all, last, secs(5)).await);
    let first = c.commands(1);
    for id in &all {
        assert_eq!(c.commands(*id), first, "node {id} diverged");
    }
    // Each acknowledged write is applied; a retried write may appear twice (at-least-once).
    for i in 0..20 {
        assert!(first.contains(&format!("lossy{i}").into_bytes()));
    }
    c.shutdown_all().await;
}
