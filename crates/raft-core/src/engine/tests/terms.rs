//! §5.1: terms. A higher term anywhere wins; a stale one is refused.

use super::*;

#[test]
fn s5_1_higher_term_in_any_message_updates_term_and_reverts_to_follower() {
    let mut c = Cluster::new(3, |c| c);
    c.elect(1);
    let leader = c.node(1);
    leader.handle_message(
        Duration::ZERO,
        msg(2, 1, 9, MessageBody::HeartbeatResponse { round: 0 }),
    );
    assert_eq!(leader.term(), 9);
    assert_eq!(leader.role(), Role::Follower);
    assert_eq!(leader.vote(), None);
    let rd = leader.take_ready();
    assert_eq!(
        rd.hard_state,
        Some(HardState {
            term: 9,
            vote: None
        }),
        "the new term must be persisted"
    );
}

#[test]
fn s5_1_stale_term_request_is_rejected_with_current_term() {
    let mut e = engine_with(cfg(1), &[1, 2, 3], 5, log_of(&[1, 2]));
    e.handle_message(
        Duration::ZERO,
        msg(2, 1, 3, append(2, 2, vec![ent(3, 3)], 0)),
    );
    assert_eq!(
        e.last_log_id(),
        LogId::new(2, 2),
        "stale leader's entries must not be accepted"
    );
    let (now, _) = take_all(&mut e);
    assert_eq!(now.len(), 1);
    assert_eq!(
        now[0].term, 5,
        "reply carries the newer term so the stale leader steps down"
    );
    assert!(matches!(
        now[0].body,
        MessageBody::AppendResponse { success: false, .. }
    ));
}

// ----- §5.2 leader election ----------------------------------------------------
