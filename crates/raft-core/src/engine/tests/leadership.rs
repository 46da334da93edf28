//! Thesis §6.2 and §9.6: heartbeats, check-quorum, pre-vote and leader leases against disruptive candidates.

use super::*;

#[test]
fn prevote_partitioned_node_does_not_inflate_its_term() {
    let mut c = Cluster::new(3, |mut c| {
        c.pre_vote = true;
        c.check_quorum = true;
        c
    });
    c.elect(1);
    let term = c.node(1).term();
    c.cut = vec![(3, 1), (3, 2), (1, 3), (2, 3)];
    for round in 1..=20u64 {
        let t = c.now + ms(300) * round as u32;
        c.tick_node(3, t);
        c.settle();
    }
    assert_eq!(
        c.node(3).term(),
        term,
        "pre-vote keeps an isolated node's term"
    );
    c.cut.clear();
    let t = c.now + ms(100);
    c.tick_node(1, t);
    c.settle();
    assert_eq!(
        c.node(1).role(),
        Role::Leader,
        "rejoining node does not disrupt the leader"
    );
    assert_eq!(c.node(3).leader(), Some(1));
}

#[test]
fn check_quorum_leader_steps_down_without_a_majority() {
    let mut c = Cluster::new(3, |mut c| {
        c.check_quorum = true;
        c
    });
    c.elect(1);
    c.cut = vec![(2, 1), (3, 1)];
    let start = c.now;
    for i in 1..=4u32 {
        c.tick_node(1, start + ms(100) * i);
        c.settle();
    }
    assert_eq!(c.node(1).role(), Role::Follower);
}

#[test]
fn check_quorum_followers_in_lease_ignore_disruptive_candidates() {
    let mut c = Cluster::new(3, |mut c| {
        c.check_quorum = true;
        c
    });
    c.elect(1);
    let term = c.node(1).term();
    c.node(2).handle_message(
        Duration::ZERO,
        msg(
            3,
            2,
            term + 1,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 99,
                last_log_term: term,
                transfer: false,
            },
        ),
    );
    assert_eq!(
        c.node(2).term(),
        term,
        "a follower that recently heard its leader ignores the request"
    );
}

// ----- heartbeats and reads --------------------------------------------------------------

#[test]
fn leader_sends_heartbeats_every_interval() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    // Elected 100 ms before its first heartbeat (settling let a couple of
    // milliseconds pass for the first commit's notice).
    let start = c.node(1).next_deadline() - ms(100);
    c.tick_node(1, start + ms(99));
    assert!(c.drain(1).is_empty());
    c.tick_node(1, start + ms(100));
    let hb: Vec<NodeId> = c
        .drain(1)
        .iter()
        .filter(|m| matches!(m.body, MessageBody::Heartbeat { .. }))
        .map(|m| m.to)
        .collect();
    assert_eq!(hb, vec![2, 3]);
}
