//! §5.4: safety. The up-to-date vote rule (§5.4.1) and committing only current-term entries (§5.4.2, Figure 8).

use super::*;

#[test]
fn s5_4_1_vote_denied_to_candidate_with_less_up_to_date_log() {
    // Our log: terms [1, 1, 3]. Candidates: lower last term; same term but shorter; equal; more up to date.
    let cases = [
        ((2, 5), false),
        ((3, 2), false),
        ((3, 3), true),
        ((3, 4), true),
        ((4, 1), true),
    ];
    for ((last_term, last_index), want) in cases {
        let mut e = engine_with(cfg(1), &[1, 2, 3], 3, log_of(&[1, 1, 3]));
        e.handle_message(
            Duration::ZERO,
            msg(
                2,
                1,
                4,
                MessageBody::VoteRequest {
                    pre_vote: false,
                    last_log_index: last_index,
                    last_log_term: last_term,
                    transfer: false,
                },
            ),
        );
        let (_, after) = take_all(&mut e);
        let granted = after
            .iter()
            .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. }));
        assert_eq!(
            granted, want,
            "candidate last log ({last_term}, {last_index})"
        );
    }
}

// ----- §5.3 log replication --------------------------------------------------------

#[test]
fn s5_4_2_figure8_old_term_entry_is_not_committed_by_counting_replicas() {
    // (c) of Figure 8: S1 is leader of term 4 with entry (2, 2) replicated to a majority (S1, S2, S3);
    // S5 holds (3, 2). S1 must not commit index 2 until an entry of term 4 is replicated.
    let s1 = log_of(&[1, 2]);
    let mut c = Cluster::from_logs(&[
        (1, 3, s1.clone()),
        (2, 3, s1.clone()),
        (3, 3, log_of(&[1])),
        (4, 3, log_of(&[1])),
        (5, 3, log_of(&[1, 3])),
    ]);
    // S1 wins term 4 with votes from S2, S3, S4; S5 is cut off.
    c.cut = vec![
        (1, 5),
        (5, 1),
        (2, 5),
        (5, 2),
        (3, 5),
        (5, 3),
        (4, 5),
        (5, 4),
    ];
    // Only let S3 receive (2,2) and not the leader's own term-4 entry: drop S1's first appends to others.
    let d = c.node(1).next_deadline();
    c.tick_node(1, d);
    for _ in 0..3 {
        let out = c.drain(1);
        for m in out {
            if m.to == 5 {
                continue;
            }
            let m = match m.body {
                // Strip the term-4 no-op so only the old entry reaches the followers.
                MessageBody::AppendEntries {
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                } => msg(
                    m.from,
                    m.to,
                    m.term,
                    append(
                        prev_log_index,
                        prev_log_term,
                        entries.into_iter().filter(|e| e.term < 4).collect(),
                        leader_commit,
                    ),
                ),
                _ => m,
            };
            c.node(m.to).handle_message(Duration::ZERO, m);
        }
        for f in 2..=4 {
            for m in c.drain(f) {
                c.node(1).handle_message(Duration::ZERO, m);
            }
        }
    }
    assert_eq!(c.node(1).role(), Role::Leader);
    assert_eq!(
        c.node(3).log_term(2),
        Some(2),
        "old entry now on a majority"
    );
    assert_eq!(
        c.node(1).commit_index(),
        0,
        "an old-term entry is never committed by counting replicas"
    );
    // Once the term-4 no-op reaches a majority (resent at the next
    // heartbeat: the stripped appends looked like partial acceptance), both
    // commit together.
    heartbeat_round(&mut c, 1);
    c.settle();
    assert_eq!(c.node(1).commit_index(), 3);
}

// ----- thesis §9.6 pre-vote, §6.2 check-quorum -------------------------------------------
