//! Elections (§5.2) and the vote rule (§5.4.1): answering vote requests
//! and counting the answers.

use super::*;

impl Engine {
    pub(super) fn on_vote_request(
        &mut self,
        from: NodeId,
        msg_term: Term,
        pre_vote: bool,
        transfer: bool,
        cand_last: LogId,
    ) {
        let up_to_date =
            cand_last >= self.log.last_log_id() || broken(Mutation::VoteIgnoresUpToDate);
        // Under lease reads a member in a leader's lease grants nothing new,
        // whatever the request's term (a retransmit of a vote it already
        // gave is not new).
        let leased = self.cfg.read_policy == crate::config::ReadPolicy::Lease
            && self.in_lease()
            && !transfer
            && self.vote != Some(from);
        let granted = if leased {
            false
        } else if pre_vote {
            msg_term > self.term && up_to_date
        } else {
            let free = self.vote == Some(from)
                || (self.vote.is_none() && self.leader.is_none())
                || (broken(Mutation::DoubleVote) && self.role == Role::Follower);
            free && up_to_date
        };
        if granted && !pre_vote {
            self.vote = Some(from);
            self.hard_state_dirty = true;
            self.reset_election_timer();
        }
        tracing::debug!(
            node = self.id,
            term = self.term,
            from,
            pre_vote,
            granted,
            "vote request"
        );
        let reply_term = if pre_vote && granted {
            msg_term
        } else {
            self.term
        };
        self.send_persisted(
            from,
            reply_term,
            MessageBody::VoteResponse { pre_vote, granted },
        );
    }

    pub(super) fn on_vote_response(
        &mut self,
        from: NodeId,
        msg_term: Term,
        pre_vote: bool,
        granted: bool,
    ) {
        let counts = match self.role {
            // A pre-vote is granted at the proposed term and refused at the voter's own.
            Role::PreCandidate if pre_vote => {
                self.term.checked_add(1) == Some(msg_term) || (!granted && msg_term == self.term)
            }
            Role::Candidate if !pre_vote => msg_term == self.term,
            _ => false,
        };
        if !counts {
            return;
        }
        self.votes.insert(from, granted);
        self.tally_votes();
    }
}
