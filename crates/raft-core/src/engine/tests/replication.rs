//! §5.3: log replication. The prevLog check, conflict repair, back-off, commit and delivery.

use super::*;

#[test]
fn s5_3_follower_rejects_when_prev_entry_does_not_match() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 2, 2, 2]));
    // prev (index 4, term 3) does not match our term 2 there.
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 3, append(4, 3, vec![ent(3, 5)], 0)),
    );
    let (_, after) = take_all(&mut e);
    match after[0].body {
        MessageBody::AppendResponse {
            success: false,
            index: 4,
            hint: Some(h),
        } => {
            assert_eq!(h.conflict_term, Some(2));
            assert_eq!(h.first_index, 3, "first index of the conflicting term");
        }
        ref b => panic!("unexpected {b:?}"),
    }
    // prev far past the end: hint says where our log ends.
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 3, append(1_000_000, 3, vec![], 0)),
    );
    let (_, after) = take_all(&mut e);
    match after[0].body {
        MessageBody::AppendResponse {
            success: false,
            hint: Some(h),
            ..
        } => {
            assert_eq!(h.conflict_term, None);
            assert_eq!(h.first_index, 6);
        }
        ref b => panic!("unexpected {b:?}"),
    }
    assert_eq!(e.last_log_id(), LogId::new(2, 5));
}

#[test]
fn s5_3_conflicting_entries_are_replaced_by_the_leaders() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 2, 2]));
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 3, append(2, 1, vec![ent(3, 3)], 0)),
    );
    let rd = e.take_ready();
    assert_eq!(rd.truncate_from, Some(3));
    assert_eq!(rd.entries, vec![ent(3, 3)]);
    assert_eq!(e.last_log_id(), LogId::new(3, 3));
    assert!(rd.messages.is_empty(), "the ack waits for durability");
    assert!(matches!(
        rd.persisted_messages[0].body,
        MessageBody::AppendResponse {
            success: true,
            index: 3,
            ..
        }
    ));
}

#[test]
fn s5_3_duplicate_append_does_not_truncate() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2, 2]));
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(1, 1, vec![ent(2, 2)], 0)),
    );
    let rd = e.take_ready();
    assert_eq!(
        rd.truncate_from, None,
        "a matching prefix must never be cut (stale, reordered message)"
    );
    assert_eq!(e.last_log_id(), LogId::new(2, 3));
}

#[test]
fn s5_3_follower_never_truncates_committed_entries() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 2, 2]));
    e.handle_message(Duration::ZERO, msg(2, 1, 2, append(3, 2, vec![], 3)));
    assert_eq!(e.commit_index(), 3);
    // A (malicious or buggy) leader of a later term sends a conflicting entry below commit.
    e.handle_message(Duration::ZERO, msg(3, 1, 4, append(3, 2, vec![], 0)));
    e.handle_message(
        Duration::ZERO,
        msg(3, 1, 4, append(1, 1, vec![ent(4, 2)], 0)),
    );
    assert_eq!(
        e.last_log_id(),
        LogId::new(2, 3),
        "committed entries survive"
    );
    assert_eq!(e.log_term(2), Some(2));
}

#[test]
fn s5_3_follower_commit_follows_leader_but_not_past_verified_entries() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 2, log_of(&[1, 1, 1, 1]));
    // The leader says commit 10, but only verified entries up to 2 in this message.
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 2, append(1, 1, vec![ent(1, 2)], 10)),
    );
    assert_eq!(e.commit_index(), 2);
}

#[test]
fn s5_3_leader_replicates_and_commits_on_majority() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let id = c.node(1).propose(b"x".to_vec()).unwrap();
    assert_eq!(id, LogId::new(1, 2));
    c.cut = vec![(1, 3), (3, 1)];
    c.settle();
    assert_eq!(
        c.node(1).commit_index(),
        2,
        "leader + node 2 are a majority"
    );
    assert_eq!(c.node(3).last_log_id().index, 1);
    assert!(c.applied_payloads(1).contains(&cmd("x")));
}

#[test]
fn s5_3_leader_counts_itself_only_for_durable_entries() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"x".to_vec()).unwrap();
    // Take the leader's ready but do not report its disk write done.
    let rd = c.node(1).take_ready();
    assert_eq!(rd.entries.len(), 1);
    for m in rd.messages.into_iter().filter(|m| m.to == 2) {
        c.node(2).handle_message(Duration::ZERO, m);
    }
    let acks = c.drain(2);
    for m in acks {
        c.node(1).handle_message(Duration::ZERO, m);
    }
    // Node 2 alone holds index 2 durably; the leader's copy is not yet durable.
    assert_eq!(c.node(1).commit_index(), 1);
    c.node(1).persisted(LogId::new(1, 2));
    assert_eq!(c.node(1).commit_index(), 2);
}

#[test]
fn s5_3_fast_backoff_skips_a_term_per_round_trip() {
    // Figure 7-like: leader log terms differ from a follower's long divergent suffix.
    let leader_log = log_of(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6]);
    let follower_log = log_of(&[1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]);
    let mut c = Cluster::from_logs(&[
        (1, 6, leader_log),
        (2, 3, follower_log),
        (3, 6, log_of(&[1, 1, 1, 4, 4, 5, 5, 6, 6, 6])),
    ]);
    c.cut = vec![(1, 3), (3, 1)];
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    // Node 2 votes (its log is behind); count AppendEntries round trips to node 2.
    let mut rounds = 0;
    for _ in 0..50 {
        let msgs = c.drain(1);
        let mut any = false;
        for m in msgs {
            if m.to == 2 {
                if matches!(m.body, MessageBody::AppendEntries { .. }) {
                    rounds += 1;
                }
                any = true;
                c.node(2).handle_message(Duration::ZERO, m);
            }
        }
        for m in c.drain(2) {
            c.node(1).handle_message(Duration::ZERO, m);
        }
        if !any {
            break;
        }
    }
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(c.node(2).last_log_id(), c.node(1).last_log_id());
    assert!(
        rounds <= 4,
        "took {rounds} AppendEntries to converge; one per term expected"
    );
}

#[test]
fn s5_3_committed_entries_are_delivered_in_order_exactly_once() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(2);
    for i in 0..50 {
        c.node(2).propose(format!("c{i}").into_bytes()).unwrap();
        if i % 7 == 0 {
            c.settle();
        }
    }
    c.settle();
    let hb = c.node(2).next_deadline();
    c.tick_node(2, hb);
    c.settle();
    for id in 1..=3 {
        let idx: Vec<LogIndex> = c.applied[&id].iter().map(|e| e.index).collect();
        assert_eq!(idx, (1..=51).collect::<Vec<_>>(), "node {id}");
    }
}

#[test]
fn s5_3_pipeline_is_bounded_by_max_inflight() {
    let mut c = Cluster::new(3, |mut c| {
        c.max_inflight = 2;
        c.max_entries_per_msg = 1;
        c
    });
    c.elect(1);
    for i in 0..10 {
        c.node(1).propose(vec![i]).unwrap();
    }
    let out = c.drain(1);
    let appends = out
        .iter()
        .filter(|m| m.to == 2 && matches!(m.body, MessageBody::AppendEntries { .. }))
        .count();
    assert_eq!(appends, 2, "at most max_inflight unanswered appends");
    for m in out {
        let to = m.to;
        c.node(to).handle_message(Duration::ZERO, m);
    }
    c.settle();
    assert_eq!(c.node(2).last_log_id(), c.node(1).last_log_id());
}

#[test]
fn s5_3_batches_respect_max_entries_and_bytes() {
    let mut c = Cluster::new(3, |mut c| {
        c.max_entries_per_msg = 4;
        c.max_bytes_per_msg = 1000;
        c
    });
    c.elect(1);
    for _ in 0..20 {
        c.node(1).propose(vec![0u8; 300]).unwrap();
    }
    for m in c.drain(1) {
        if let MessageBody::AppendEntries { entries, .. } = &m.body {
            assert!(entries.len() <= 4);
            let bytes: usize = entries.iter().map(|e| e.payload.size_hint()).sum();
            assert!(
                entries.len() <= 1 || bytes <= 1000,
                "{bytes} bytes in one message"
            );
        }
    }
}

// ----- §5.4.2 committing entries from previous terms (Figure 8) ------------------------

/// Writes proposed one after another, each while the previous one's
/// messages are still moving (the shape of MIT 6.5840's "Count" test: 11
/// agreements on 3 nodes within 42 requests), with `delay`: the requests
/// the leader sent until every node applied them all, and whether the
/// followers had applied the last one before the notice delay passed.
fn requests_for_writes(delay: Duration) -> (u64, bool) {
    let mut c = Cluster::new(3, |mut cfg| {
        cfg.commit_notice_delay = delay;
        cfg
    });
    c.elect(1);
    heartbeat_round(&mut c, 1);
    c.requests = 0;
    let start = c.now;
    let mut last = 0;
    for i in 0..11 {
        last = c
            .node(1)
            .propose(format!("w{i}").into_bytes())
            .unwrap()
            .index;
        c.step();
    }
    c.settle_in_no_time();
    let followers_knew = [2, 3]
        .iter()
        .all(|id| c.applied[id].last().is_some_and(|e| e.index == last));
    assert!(c.node(1).next_deadline() <= start + delay.max(ms(100)));
    c.tick_node(1, start + delay);
    c.settle();
    for id in 1..=3 {
        assert_eq!(
            c.applied[&id].last().map(|e| e.index),
            Some(last),
            "node {id} applied every write once the notice went out"
        );
    }
    (c.requests, followers_knew)
}

#[test]
fn the_commit_index_rides_on_later_appends_and_a_delayed_notice_reaches_idle_followers() {
    let (deferred, knew) = requests_for_writes(ms(2));
    // One append per follower per write, one notice round at the end.
    assert!(
        deferred <= 2 * 11 + 2,
        "{deferred} requests for 11 writes on 3 nodes"
    );
    assert!(!knew, "the last index waits for the notice");
    // Told at once, every commit costs each follower one more append.
    let (immediate, knew) = requests_for_writes(Duration::ZERO);
    assert!(knew);
    assert!(
        immediate > 42,
        "{immediate} requests with the notice sent at once"
    );
}
