//! Thesis §4.1: the membership in the log counts, committed or not, and is reverted when its entry is truncated.

use super::*;

#[test]
fn quorum_comes_from_the_membership_in_the_log() {
    // Initial config says 5 voters, but the log's latest membership entry says 3.
    let mut entries = log_of(&[1]);
    entries.push(Entry {
        term: 1,
        index: 2,
        payload: EntryPayload::Membership(Membership::new([1, 2, 3])),
    });
    let init = InitialState {
        hard_state: HardState {
            term: 1,
            vote: None,
        },
        entries,
        membership: Membership::new([1, 2, 3, 4, 5]),
        ..Default::default()
    };
    let e = Engine::new(cfg(1), init, 1, Duration::ZERO).unwrap();
    assert_eq!(e.membership().voters.len(), 3);
    assert_eq!(e.membership().quorum(), 2);
}

// ----- bad input ---------------------------------------------------------------------------

#[test]
fn thesis_4_1_follower_uses_the_latest_membership_in_its_log_and_reverts_on_truncation() {
    let mut e = engine_with(cfg(2), &[1, 2, 3], 1, log_of(&[1]));
    // Appended, not committed: in force at once.
    e.handle_message(
        Duration::ZERO,
        msg(
            1,
            2,
            1,
            append(1, 1, vec![members_entry(1, 2, &[1, 2, 3, 4])], 1),
        ),
    );
    assert_eq!(e.membership(), &Membership::new([1, 2, 3, 4]));
    assert_eq!(e.commit_index(), 1, "not committed");
    let _ = take_all(&mut e);
    // A new leader's entry replaces it: the earlier membership is back.
    e.handle_message(
        Duration::ZERO,
        msg(3, 2, 2, append(1, 1, vec![ent(2, 2)], 1)),
    );
    assert_eq!(e.log_term(2), Some(2));
    assert_eq!(e.membership(), &Membership::new([1, 2, 3]));
}

#[test]
fn thesis_4_1_restart_adopts_the_latest_membership_entry_committed_or_not() {
    let mut entries = log_of(&[1, 1]);
    entries.push(members_entry(1, 3, &[1, 2]));
    entries.push(ent(1, 4));
    let e = engine_with(cfg(2), &[1, 2, 3], 1, entries);
    assert_eq!(e.commit_index(), 0);
    assert_eq!(e.membership(), &Membership::new([1, 2]));
}

#[test]
fn compaction_past_a_membership_entry_tells_the_store_the_new_base() {
    let mut c = Cluster::new(1, |mut c| {
        c.compact_threshold = 2;
        c
    });
    c.elect(1);
    // The single node appends a membership entry naming itself again
    // (a no-change entry: enough to see it stored as the base).
    c.node(1)
        .propose_payload(EntryPayload::Membership(Membership::new([1])))
        .unwrap();
    for i in 0..4u8 {
        c.node(1).propose(vec![i]).unwrap();
    }
    c.settle();
    let applied = c.node(1).applied_index();
    c.node(1).release(applied);
    let rd = c.node(1).take_ready();
    assert!(rd.purge_to.is_some(), "compacted");
    assert_eq!(rd.membership, Some(Membership::new([1])));
}

// ----- proposal size and back-pressure ----------------------------------------
