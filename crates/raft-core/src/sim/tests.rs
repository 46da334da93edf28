//! Seeded whole-cluster simulation runs, and proof that the checkers can fail.

use super::{Sim, SimConfig, Violation};
use crate::engine::Bugs;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nodes_for(seed: u64) -> usize {
    [3, 5, 7][(seed % 3) as usize]
}

/// The normal run: at least 300 seeds (RAFT_SIM_SEEDS for more) of thousands
/// of faulty steps each (RAFT_SIM_STEPS), on 3, 5 and 7 nodes.
#[test]
fn safety_and_liveness_across_seeds() {
    let seeds = env_u64("RAFT_SIM_SEEDS", 300);
    let steps = env_u64("RAFT_SIM_STEPS", 3000) as usize;
    let first = env_u64("RAFT_SIM_FIRST_SEED", 1);
    let mut total_steps = 0usize;
    let mut total_committed = 0u64;
    let mut crashes = 0usize;
    let mut reads = 0usize;
    let mut purges = 0usize;
    let mut restarts_compacted = 0usize;
    for seed in first..first + seeds {
        match Sim::new(SimConfig::new(seed, nodes_for(seed), steps)).run() {
            Ok(stats) => {
                total_steps += stats.steps;
                total_committed += stats.committed;
                crashes += stats.crashes;
                reads += stats.reads_confirmed;
                purges += stats.purges;
                restarts_compacted += stats.restarts_compacted;
            }
            Err(v) => panic!("{v}"),
        }
    }
    println!(
        "simulated {seeds} seeds (3/5/7 nodes), {total_steps} steps, {total_committed} entries committed, {crashes} crashes, {reads} reads confirmed, {purges} log compactions, {restarts_compacted} restarts from a compacted log"
    );
    assert!(
        total_committed > seeds,
        "the simulated clusters should commit work"
    );
    assert!(
        purges > 0 && restarts_compacted > 0,
        "the runs should compact logs and restart from compacted logs"
    );
}

/// Replays one seed: RAFT_SIM_SEED=N (RAFT_SIM_NODES, RAFT_SIM_STEPS optional).
#[test]
fn replay_seed() {
    let seed = env_u64("RAFT_SIM_SEED", 42);
    let nodes = env_u64("RAFT_SIM_NODES", nodes_for(seed) as u64) as usize;
    let steps = env_u64("RAFT_SIM_STEPS", 3000) as usize;
    match Sim::new(SimConfig::new(seed, nodes, steps)).run() {
        Ok(stats) => {
            println!("seed {seed}: {stats:?}");
            assert!(stats.committed > 0);
        }
        Err(v) => panic!("{v}"),
    }
}

/// Without faults every cluster commits steadily and every proposal goes through.
#[test]
fn fault_free_clusters_make_progress() {
    for seed in 1..=30 {
        let mut cfg = SimConfig::new(seed, nodes_for(seed), 2000);
        cfg.faults = false;
        let stats = Sim::new(cfg).run().unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(stats.crashes, 0);
        assert!(
            stats.committed >= 100,
            "seed {seed}: only {} committed",
            stats.committed
        );
        assert!(stats.reads_confirmed > 0, "seed {seed}: no read confirmed");
        // A healthy cluster keeps its leader: heartbeats must hold followers back.
        assert!(
            stats.leaders_elected <= 2,
            "seed {seed}: {} leaders without any fault",
            stats.leaders_elected
        );
    }
}

fn first_violation(bugs: Bugs, pre_vote: bool, seeds: u64) -> Option<Violation> {
    (1..=seeds).find_map(|seed| {
        let mut cfg = SimConfig::new(seed, 3, 3000);
        cfg.bugs = bugs;
        cfg.pre_vote = pre_vote;
        Sim::new(cfg).run().err()
    })
}

/// The checker can fail: granting two votes in one term must be caught.
#[test]
fn checker_catches_double_voting() {
    let bugs = Bugs {
        double_vote: true,
        ..Bugs::default()
    };
    let v = first_violation(bugs, false, 300).expect("double voting went unnoticed");
    println!("caught as expected: {v}");
    assert!(v.what.contains("Election Safety"), "unexpected report: {v}");
}

/// The checker can fail: committing an old-term entry by counting replicas (§5.4.2, Figure 8).
#[test]
fn checker_catches_old_term_commit() {
    let bugs = Bugs {
        commit_old_term: true,
        ..Bugs::default()
    };
    let v = first_violation(bugs, true, 3000).expect("old-term commit went unnoticed");
    println!("caught as expected: {v}");
    assert!(
        v.what.contains("State Machine Safety") || v.what.contains("Leader Completeness"),
        "unexpected report: {v}"
    );
}

/// The checker can fail: a leader that compacts entries a follower still
/// lacks leaves that follower unable to catch up (there are no snapshots).
#[test]
fn checker_catches_compaction_ahead_of_followers() {
    let bugs = Bugs {
        compact_ignoring_peers: true,
        ..Bugs::default()
    };
    let v = first_violation(bugs, true, 300).expect("unsafe compaction went unnoticed");
    println!("caught as expected: {v}");
    assert!(
        v.what.contains("compaction point"),
        "unexpected report: {v}"
    );
}
