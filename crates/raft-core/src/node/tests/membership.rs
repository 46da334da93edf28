//! Membership changes and leadership transfer through real nodes.

use super::*;
use crate::engine::ChangeStep;

/// `Raft::transfer_leadership` returns once the target leads, whatever
/// status the handle saw before the driver took the request.
#[tokio::test(start_paused = true)]
async fn transfer_leadership_returns_once_the_target_leads() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(5)).await.expect("a leader");
    c.write(&[1, 2, 3], "a", secs(5)).await.unwrap();
    for round in 0..4 {
        let l = c.current_leader(&[1, 2, 3]).expect("a leader");
        let to = if round % 2 == 0 {
            None
        } else {
            Some(l % 3 + 1)
        };
        let target = c.raft(l).transfer_leadership(to).await.unwrap();
        assert_ne!(target, l);
        if let Some(t) = to {
            assert_eq!(target, t);
        }
        assert!(
            c.raft(target).is_leader(),
            "round {round}: node {target} leads"
        );
    }
    let _ = l;
    c.shutdown_all().await;
}

/// A membership change returns the final configuration once it is committed.
#[tokio::test(start_paused = true)]
async fn change_membership_returns_the_committed_configuration() {
    let mut c = TestCluster::new(3).await;
    let l = c.wait_leader(&[1, 2, 3], secs(5)).await.expect("a leader");
    let other = [1, 2, 3].into_iter().find(|&i| i != l).unwrap();
    let m = c
        .raft(l)
        .change_membership(vec![ChangeStep::Demote(other)])
        .await
        .unwrap();
    assert!(m.learners.contains(&other) && !m.is_joint(), "{m}");
    assert_eq!(c.raft(l).status().change_in_flight, None);
    c.shutdown_all().await;
}
