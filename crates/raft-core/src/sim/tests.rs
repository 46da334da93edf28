//! Seeded whole-cluster simulation runs, and proof that the checkers can fail.

use super::{Sim, SimConfig, Violation};
use crate::mutation::Mutation;

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
    let (mut lease_reads, mut lease_seeds) = (0u64, 0u64);
    let (mut snaps_taken, mut snaps_delivered, mut snaps_loaded, mut snap_restarts) = (0, 0, 0, 0);
    let (mut lost, mut awaited) = (0usize, 0usize);
    for seed in first..first + seeds {
        let cfg = SimConfig::new(seed, nodes_for(seed), steps);
        lease_seeds += u64::from(cfg.lease);
        match Sim::new(cfg).run() {
            Ok(stats) => {
                lease_reads += stats.lease_reads;
                total_steps += stats.steps;
                total_committed += stats.committed;
                crashes += stats.crashes;
                reads += stats.reads_confirmed;
                purges += stats.purges;
                restarts_compacted += stats.restarts_compacted;
                snaps_taken += stats.snapshots_taken;
                snaps_delivered += stats.snapshots_delivered;
                snaps_loaded += stats.snapshots_loaded;
                snap_restarts += stats.restarts_from_snapshot;
                lost += stats.app_state_lost;
                awaited += stats.restarts_awaiting_snapshot;
            }
            Err(v) => panic!("{v}"),
        }
    }
    println!("{lease_reads} reads answered under a lease on {lease_seeds} lease seeds");
    assert!(
        lease_reads > 0,
        "the lease seeds should answer reads under a lease"
    );
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
    println!(
        "snapshots: {snaps_taken} taken, {snaps_delivered} delivered to followers, {snaps_loaded} loaded, {snap_restarts} restarts that had to load one first"
    );
    println!("{lost} crashes lost the application's files; {awaited} restarts then waited for the leader's snapshot");
    assert!(
        snaps_taken > 0 && snaps_delivered > 0 && snaps_loaded > 0 && snap_restarts > 0,
        "the snapshot seeds should take, send, load and restart from snapshots"
    );
    assert!(
        awaited > 0,
        "some restarts should have lost their state and waited for a snapshot"
    );
}

/// Replays one seed: RAFT_SIM_SEED=N (RAFT_SIM_NODES, RAFT_SIM_STEPS optional).
#[test]
fn replay_seed() {
    let seed = env_u64("RAFT_SIM_SEED", 42);
    let nodes = env_u64("RAFT_SIM_NODES", nodes_for(seed) as u64) as usize;
    let steps = env_u64("RAFT_SIM_STEPS", 3000) as usize;
    let cfg = SimConfig::new(seed, nodes, steps);
    if std::env::var_os("RAFT_SIM_DEBUG").is_some() {
        eprintln!("{cfg:?}");
    }
    if std::env::var_os("RAFT_SIM_TRACE").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .without_time()
            .try_init();
    }
    match Sim::new(cfg).run() {
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
        // Throughput is the point here: the default back-pressure limit,
        // and no leadership transfers (proposals pause during each).
        cfg.max_unapplied_bytes = None;
        cfg.membership_changes = false;
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

/// The reports that show the checker aimed at a broken rule fired (any other
/// failure is counted, but does not prove that checker works).
fn expected_reports(m: Mutation) -> &'static [&'static str] {
    match m {
        Mutation::VoteBeforeDurable => &["Vote durability", "Election Safety"],
        Mutation::LeaderCountsUnsynced | Mutation::AckBeforeDurable => &["Commit durability"],
        Mutation::AnyHeartbeatConfirmsRead
        | Mutation::ReadWithoutQuorum
        | Mutation::LeaseWithoutDriftMargin
        | Mutation::LeaseFromAnswer => &["stale read"],
        Mutation::CompactIgnoringReleased => &["past what the application stored"],
        Mutation::DoubleVote => &["Election Safety", "Vote durability"],
        Mutation::VoteIgnoresUpToDate | Mutation::CommitOldTerm => {
            &["Leader Completeness", "State Machine Safety"]
        }
        Mutation::HeartbeatCommitUncapped => &["State Machine Safety"],
        Mutation::CompactIgnoringPeers => &["below its compaction point"],
        Mutation::TruncateAfterAppend => &["Commit durability", "truncated applied"],
        Mutation::ReapplyAfterRestart => &["applied twice"],
        Mutation::CommitPastVerified => &["beyond its log", "State Machine Safety"],
        Mutation::DriverSendsBeforeSave => &[],
        Mutation::InstallOlderThanCommit => &["state went back"],
        Mutation::DiscardMatchingSuffix => &["follow the snapshot's matching last entry"],
        Mutation::JointCommitNewOnly
        | Mutation::JointCommitOldOnly
        | Mutation::LearnerCountsInQuorum => &["Commit durability", "Vote durability"],
        Mutation::TwoChangesInFlight => &["Configuration change"],
    }
}

/// Runs `seeds` seeds with `m` broken; returns how many were caught by the
/// checker aimed at it, how many by any check, and the first aimed report.
fn catch_rate(m: Mutation, first: u64, seeds: u64, steps: usize) -> (u64, u64, Option<Violation>) {
    let mut caught = 0;
    let mut caught_any = 0;
    let mut example = None;
    let t0 = std::time::Instant::now();
    let mut slowest = (std::time::Duration::ZERO, 0);
    for seed in first..first + seeds {
        let mut cfg = SimConfig::new(seed, nodes_for(seed), steps);
        cfg.mutation = Some(m);
        if matches!(
            m,
            Mutation::LeaseWithoutDriftMargin | Mutation::LeaseFromAnswer
        ) {
            // Only a lease reader can break a lease rule.
            cfg.lease = true;
            cfg.check_quorum = true;
            cfg.drift_ppm = env_u64("RAFT_SIM_DRIFT_PPM", cfg.drift_ppm);
        }
        match m {
            // Snapshot rules need snapshots; the compaction rules of a
            // log without them are only visible without.
            Mutation::InstallOlderThanCommit | Mutation::DiscardMatchingSuffix => {
                cfg.snapshots = true
            }
            Mutation::CompactIgnoringPeers | Mutation::CompactIgnoringReleased => {
                cfg.snapshots = false
            }
            _ => {}
        }
        if matches!(
            m,
            Mutation::JointCommitNewOnly
                | Mutation::JointCommitOldOnly
                | Mutation::TwoChangesInFlight
                | Mutation::LearnerCountsInQuorum
        ) {
            // Membership rules need membership changes (and snapshots, for
            // members added after compaction).
            cfg.membership_changes = true;
            cfg.snapshots = true;
        }
        let t = std::time::Instant::now();
        let res = Sim::new(cfg).run();
        if let (Ok(st), true) = (&res, std::env::var("RAFT_SIM_DEBUG_LEASE").is_ok()) {
            if st.deposed_lease_reads > 0 {
                println!(
                    "seed {seed}: {} deposed lease reads of {}",
                    st.deposed_lease_reads, st.lease_reads
                );
            }
        }
        if let Err(v) = res {
            caught_any += 1;
            if std::env::var_os("RAFT_SIM_SHOW_ANY").is_some() {
                println!("seed {seed}: {}", first_line(&v.what));
            }
            if expected_reports(m).iter().any(|r| v.what.contains(r)) {
                caught += 1;
                example.get_or_insert(v);
            }
        }
        slowest = slowest.max((t.elapsed(), seed));
    }
    println!(
        "  ({m:?}: {:?} in all, slowest seed {} took {:?})",
        t0.elapsed(),
        slowest.1,
        slowest.0
    );
    (caught, caught_any, example)
}

/// The mutation matrix: with each safety rule broken on purpose, the
/// simulator must catch it within the CI budget (RAFT_MUTATION_SEEDS seeds
/// per mutation, default 1000). Prints each mutation's catch rate.
#[test]
fn simulator_catches_every_mutation() {
    let seeds = env_u64("RAFT_MUTATION_SEEDS", 1000);
    let steps = env_u64("RAFT_SIM_STEPS", 3000) as usize;
    let first = env_u64("RAFT_SIM_FIRST_SEED", 1);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // RAFT_MUTATION_ONLY=Name runs one mutation (for tuning and debugging).
    let only = std::env::var("RAFT_MUTATION_ONLY").ok();
    let queue = std::sync::Mutex::new(
        Mutation::ENGINE
            .into_iter()
            .filter(|m| only.as_ref().is_none_or(|o| format!("{m:?}") == *o))
            .collect::<Vec<_>>(),
    );
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some(m) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    return;
                };
                let r = catch_rate(m, first, seeds, steps);
                results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((m, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    results.sort_by_key(|(m, _)| *m);
    println!("mutation catch rates ({seeds} seeds of {steps} steps each, 3/5/7 nodes):");
    let mut missed = Vec::new();
    println!("  (mutation, caught by the check aimed at it, caught by any check)");
    for (m, (caught, caught_any, example)) in &results {
        println!(
            "  {:<26} {caught:>4}/{seeds} {caught_any:>4}/{seeds}  {}",
            format!("{m:?}"),
            example.as_ref().map_or(String::new(), |v| format!(
                "first: seed {} - {}",
                v.seed,
                first_line(&v.what)
            ))
        );
        if *caught == 0 {
            missed.push(*m);
        }
    }
    assert_eq!(results.len(), Mutation::ENGINE.len());
    assert!(
        missed.is_empty(),
        "the simulator missed these broken rules: {missed:?}"
    );
}

fn first_line(s: &str) -> &str {
    let s = s.lines().next().unwrap_or("");
    &s[..s.len().min(110)]
}
