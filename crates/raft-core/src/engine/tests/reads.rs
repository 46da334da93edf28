//! Thesis §6.4: linearizable reads through the read index and a heartbeat round.

use super::*;

#[test]
fn read_index_waits_for_a_quorum_round_and_returns_commit() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).propose(b"a".to_vec()).unwrap();
    c.settle();
    c.node(1).read_index(Duration::ZERO, 77).unwrap();
    let out = c.drain(1);
    assert!(
        c.reads.get(&1).is_none_or(|r| r.is_empty()),
        "not answered before a quorum confirms"
    );
    assert!(out
        .iter()
        .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })));
    for m in out {
        let to = m.to;
        c.node(to).handle_message(Duration::ZERO, m);
    }
    c.settle();
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 77,
            result: Ok(2)
        }]
    );
    assert_eq!(
        c.node(2).read_index(Duration::ZERO, 1),
        Err(NotLeader { leader: Some(1) })
    );
}

#[test]
fn read_index_on_a_new_leader_waits_for_its_noop() {
    let mut c = Cluster::new(3, |c| c);
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    // Deliver votes only, so the leader exists but has not committed its no-op.
    for m in c.drain(1) {
        let to = m.to;
        c.node(to).handle_message(Duration::ZERO, m);
    }
    for f in [2, 3] {
        for m in c.drain(f) {
            c.node(1).handle_message(Duration::ZERO, m);
        }
    }
    assert!(c.node(1).is_leader());
    assert_eq!(c.node(1).commit_index(), 0);
    c.node(1).read_index(Duration::ZERO, 5).unwrap();
    c.settle();
    let hb = c.now + ms(100);
    c.tick_node(1, hb);
    c.settle();
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 5,
            result: Ok(1)
        }]
    );
}

#[test]
fn pending_reads_fail_when_leadership_is_lost() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    c.node(1).read_index(Duration::ZERO, 9).unwrap();
    let t = c.node(1).term();
    c.node(1).handle_message(
        Duration::ZERO,
        msg(2, 1, t + 1, MessageBody::HeartbeatResponse { round: 0 }),
    );
    c.drain(1);
    assert_eq!(
        c.reads[&1],
        vec![ReadResult {
            ctx: 9,
            result: Err(NotLeader { leader: None })
        }]
    );
}

fn lease_cluster() -> Cluster {
    Cluster::new(3, |mut c| {
        c.check_quorum = true;
        c.read_policy = crate::config::ReadPolicy::Lease;
        c
    })
}

/// Thesis §6.4.1: after a majority acknowledged a heartbeat sent at T, the
/// leader answers reads at once until T + election_timeout_min - margin;
/// then it falls back to a heartbeat round, never to its own state alone.
#[test]
fn lease_reads_answer_at_once_until_the_lease_from_the_sent_heartbeat_lapses() {
    let mut c = lease_cluster();
    // Followers just started: they ignore candidates for one election timeout.
    c.tick_node(2, ms(150));
    c.tick_node(3, ms(150));
    c.elect(1);
    c.node(1).propose(b"a".to_vec()).unwrap();
    c.settle();
    // A heartbeat round sent at `sent`, answered by both followers.
    let sent = c.now + ms(100);
    c.tick_node(1, sent);
    c.settle();
    let in_lease = sent + ms(119);
    c.node(1).read_index(in_lease, 7).unwrap();
    let out = c.drain(1);
    assert!(
        !out.iter()
            .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })),
        "a read in the lease needs no round"
    );
    assert_eq!(
        c.reads[&1].last(),
        Some(&ReadResult {
            ctx: 7,
            result: Ok(2)
        })
    );
    // 150 ms (election_timeout_min) - 30 ms (margin) after the send: lapsed.
    let lapsed = sent + ms(120);
    c.node(1).read_index(lapsed, 8).unwrap();
    let out = c.drain(1);
    assert!(
        out.iter()
            .any(|m| matches!(m.body, MessageBody::Heartbeat { .. })),
        "a lapsed lease falls back to a heartbeat round"
    );
    assert!(c.reads[&1].iter().all(|r| r.ctx != 8), "not answered yet");
}

/// A member that (re)starts under lease reads ignores candidates for one
/// election timeout: before it went down it may have acknowledged a
/// heartbeat whose lease still runs.
#[test]
fn lease_a_restarted_member_ignores_candidates_for_one_election_timeout() {
    let mut c = lease_cluster();
    let vote = |term| {
        msg(
            1,
            2,
            term,
            MessageBody::VoteRequest {
                pre_vote: false,
                last_log_index: 0,
                last_log_term: 0,
                transfer: false,
            },
        )
    };
    c.node(2).handle_message(ms(149), vote(5));
    assert_eq!(c.node(2).term(), 0, "ignored inside the startup lease");
    c.node(2).handle_message(ms(150), vote(6));
    assert_eq!(c.node(2).term(), 6);
    assert_eq!(c.node(2).vote(), Some(1));
}

/// A member that acknowledged a leader's heartbeat keeps its promise even
/// when a stray reply with a higher term makes it forget that leader: it
/// grants no vote, at that term or the next, until the lease has run out.
#[test]
fn lease_a_stray_higher_term_does_not_free_a_member_to_vote() {
    let mut c = lease_cluster();
    c.tick_node(2, ms(150));
    c.tick_node(3, ms(150));
    c.elect(1);
    c.settle();
    let t = c.now;
    assert_eq!(c.node(2).leader(), Some(1));
    let term = c.node(2).term();
    // A late rejection from node 3, carrying a newer term.
    c.node(2).handle_message(
        t,
        msg(
            3,
            2,
            term + 1,
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: false,
            },
        ),
    );
    assert_eq!(c.node(2).term(), term + 1);
    assert_eq!(c.node(2).leader(), None);
    let request = |term, pre_vote| {
        msg(
            3,
            2,
            term,
            MessageBody::VoteRequest {
                pre_vote,
                last_log_index: 10,
                last_log_term: 10,
                transfer: false,
            },
        )
    };
    c.node(2)
        .handle_message(t + ms(1), request(term + 1, false));
    c.node(2).handle_message(t + ms(2), request(term + 2, true));
    let answers = c.drain(2);
    assert!(
        !answers
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. })),
        "a member in a lease granted a vote: {answers:?}"
    );
    assert_eq!(c.node(2).vote(), None);
    // Once the lease has run out it may vote again.
    c.node(2)
        .handle_message(t + ms(151), request(term + 1, false));
    assert_eq!(c.node(2).vote(), Some(3));
}
