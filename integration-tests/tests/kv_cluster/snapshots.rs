//! Snapshots between real processes over QUIC: a follower down while the
//! others compact past it, a wiped follower, SIGKILL of either end of a
//! transfer, the whole cluster restarted from snapshots, and backup and
//! restore; client histories checked for linearizability throughout.

use crate::clients::*;
use crate::cluster::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Options that make every node snapshot often and compact right after.
fn snapshotting(c: &mut Cluster, threshold: u64) {
    c.extra = vec![
        "--snapshot-threshold".into(),
        threshold.to_string(),
        "--compact-threshold".into(),
        "100".into(),
    ];
}

/// `n` SETs of `size`-byte values through one pipelined connection, in
/// batches; keys `prefix0..`.
fn bulk_sets(c: &Cluster, id: u64, prefix: &str, n: usize, size: usize) {
    let mut conn = c.conn(id);
    for start in (0..n).step_by(5000) {
        let mut p = redis::pipe();
        for i in start..(start + 5000).min(n) {
            let mut v = format!("{prefix}-value-{i}-").into_bytes();
            v.resize(size.max(v.len()), b'x');
            p.set(format!("{prefix}{i}"), v);
        }
        let _: Vec<String> = p.query(&mut conn).unwrap();
    }
}

/// Every `step`th key of `bulk_sets(prefix, n)` and the last one, read on `id`.
fn check_bulk(c: &Cluster, id: u64, prefix: &str, n: usize, step: usize) {
    let idx: Vec<usize> = (0..n).step_by(step).chain([n - 1]).collect();
    let keys: Vec<String> = idx.iter().map(|i| format!("{prefix}{i}")).collect();
    let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
        .arg(&keys)
        .query(&mut c.conn(id))
        .unwrap();
    for (i, v) in idx.iter().zip(vals) {
        let v = v.unwrap_or_else(|| panic!("{prefix}{i} missing on node {id}"));
        let want = format!("{prefix}-value-{i}-").into_bytes();
        assert!(v.starts_with(&want), "{prefix}{i} on node {id}");
    }
}

/// Waits (polling closely) until the node in `dir` holds at least a MiB
/// of a snapshot being received.
fn wait_for_part(dir: &Path) {
    let end = Instant::now() + Duration::from_secs(30);
    while part_bytes(dir) < 1 << 20 {
        assert!(
            Instant::now() < end,
            "timed out: no snapshot transfer started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Bytes of snapshots being received by the node in `dir`.
fn part_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("snapshots"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A follower is down while 100,000 writes go through and the others take
/// snapshots and compact their logs far past what it holds. Back up, it
/// gets the leader's snapshot, then the log; clients on every node see a
/// linearizable history throughout.
#[test]
fn a_follower_down_through_100k_writes_comes_back_by_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    snapshotting(&mut c, 20_000);
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    let down = ids.iter().copied().find(|&id| id != leader).unwrap();
    let addrs = c.client.clone();
    let recorded = with_clients(&addrs, 3, |_| {
        std::thread::sleep(Duration::from_millis(300));
        c.kill(down);
        let held = info_num(&c, leader, "last_log_index");
        bulk_sets(&c, leader, "s", 100_000, 16);
        eventually(
            "the others compact past the down node",
            Duration::from_secs(30),
            || {
                ids.iter()
                    .filter(|&&id| id != down)
                    .all(|&id| info_num(&c, id, "purged_index") > held + 50_000)
            },
        );
        c.start(down);
        let commit = info_num(&c, leader, "commit_index");
        eventually(
            "the restarted node catches up",
            Duration::from_secs(60),
            || info_num(&c, down, "applied_index") >= commit,
        );
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(
        info_num(&c, down, "snapshot_index") > 50_000,
        "caught up by a snapshot: {:?}",
        c.info(down)
    );
    let log = std::fs::read_to_string(tmp.path().join(format!("node-{down}.log"))).unwrap();
    assert!(log.contains("snapshot loaded"), "{log}");
    check_bulk(&c, down, "s", 100_000, 997);
    assert_linearizable(&recorded);
}

/// A follower whose data directory was wiped and that restarts under its
/// old id is refused (its storage identity is not the recorded one) and
/// exits saying how to recover; removed and started again with `--join`,
/// it is added as a learner, rebuilt by the leader's snapshot and promoted.
#[test]
fn a_wiped_follower_is_refused_then_rejoins_and_is_rebuilt_by_a_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    snapshotting(&mut c, 5_000);
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    // Down while the others write: it holds compaction back, so they
    // snapshot (a cluster that keeps up compacts without snapshots).
    let wiped = ids.iter().copied().find(|&id| id != leader).unwrap();
    c.kill(wiped);
    bulk_sets(&c, leader, "w", 20_000, 16);
    eventually("the leader snapshots", Duration::from_secs(20), || {
        info_num(&c, leader, "snapshot_index") >= 15_000
            && info_num(&c, leader, "purged_index") > 10_000
    });
    let dir = tmp.path().join(format!("node-{wiped}"));
    std::fs::remove_dir_all(&dir).unwrap();
    c.start(wiped);
    let log_path = tmp.path().join(format!("node-{wiped}.log"));
    eventually("the wiped node is refused", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains("refuses node"))
    });
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("--join"),
        "the error says how to recover: {log}"
    );
    assert!(
        info_num(&c, leader, "commit_index") >= 20_000,
        "the cluster kept serving"
    );
    c.kill(wiped);
    let removed: String = redis::cmd("RAFT.MEMBER")
        .arg("REMOVE")
        .arg(wiped)
        .query(&mut c.conn(leader))
        .unwrap();
    assert!(!removed.contains(&wiped.to_string()), "{removed}");
    std::fs::remove_dir_all(&dir).unwrap();
    let n = c.extra.len();
    c.extra.push("--join".into());
    c.extra.push(c.client[&leader].to_string());
    c.start(wiped);
    c.extra.truncate(n);
    eventually(
        "the node rejoined as a voter",
        Duration::from_secs(60),
        || {
            c.info(leader)
                .get("raft_voters")
                .is_some_and(|v| v.split(',').any(|x| x == wiped.to_string()))
        },
    );
    let commit = info_num(&c, leader, "commit_index");
    eventually("the new member is rebuilt", Duration::from_secs(60), || {
        c.info(wiped)
            .get("applied_index")
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|a| a >= commit)
    });
    let size: u64 = redis::cmd("DBSIZE").query(&mut c.conn(wiped)).unwrap();
    assert_eq!(size, 20_000);
    check_bulk(&c, wiped, "w", 20_000, 499);
}

/// SIGKILL of the receiving follower in the middle of a transfer, then of
/// the sending leader in the middle of the next: the follower restarts
/// with a part of the snapshot (and resumes after it), a new leader sends
/// its own, and the follower ends up with the whole state, never a mix.
#[test]
fn sigkill_of_either_end_during_a_transfer_leaves_old_or_new_state() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    // One snapshot, at about 30,000 of the bulk writes, and no newer one
    // until the receiver has restarted: it is sent the same snapshot again,
    // which it resumes. Small chunks: a transfer of ~40 MB takes long
    // enough to be caught.
    snapshotting(&mut c, 30_000);
    // Elections slow enough that a busy machine keeps its leader (a new
    // one would send a snapshot of its own, which nothing resumes).
    c.extra.extend(
        [
            "--snapshot-chunk-bytes",
            "8192",
            "--election-min-ms",
            "1000",
            "--election-max-ms",
            "2000",
        ]
        .map(String::from),
    );
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    let f = ids.iter().copied().find(|&id| id != leader).unwrap();
    let fdir = tmp.path().join(format!("node-{f}"));
    c.kill(f);
    bulk_sets(&c, leader, "k", 40_000, 1000);
    eventually("the leader snapshots", Duration::from_secs(30), || {
        info_num(&c, leader, "purged_index") > 15_000
    });
    let addrs: std::collections::BTreeMap<u64, std::net::SocketAddr> = c
        .client
        .iter()
        .filter(|(&id, _)| id != f)
        .map(|(&id, &a)| (id, a))
        .collect();
    // 1. Kill the receiver mid-transfer; it resumes after its part.
    c.start(f);
    wait_for_part(&fdir);
    c.kill(f);
    assert!(
        part_bytes(&fdir) > 0,
        "the receiver kept part of the snapshot"
    );
    let kept = part_bytes(&fdir);
    let recorded = with_clients(&addrs, 2, |_| {
        // 2. Back up (resuming); kill the sender mid-transfer this time.
        c.start(f);
        let end = Instant::now() + Duration::from_secs(30);
        while part_bytes(&fdir) > 0 && part_bytes(&fdir) < kept + (256 << 10) {
            assert!(Instant::now() < end, "the transfer never resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let sender = c.wait_leader(&ids);
        c.kill(sender);
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != sender).collect();
        let commit = {
            let l = c.wait_leader(&others);
            info_num(&c, l, "commit_index")
        };
        eventually("the follower catches up", Duration::from_secs(90), || {
            c.info(f)
                .get("applied_index")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|a| a >= commit)
        });
        c.start(sender);
        std::thread::sleep(Duration::from_millis(1500));
    });
    let log = std::fs::read_to_string(tmp.path().join(format!("node-{f}.log"))).unwrap();
    assert!(log.contains("resuming a snapshot transfer"), "{log}");
    let size: u64 = redis::cmd("DBSIZE").query(&mut c.conn(f)).unwrap();
    assert!(size >= 40_000, "the whole state: {size}");
    check_bulk(&c, f, "k", 40_000, 1999);
    assert_linearizable(&recorded);
}

/// Every node compacted behind snapshots; all three are SIGKILLed (their
/// state machines lose what they had not flushed) and restarted: each
/// loads its snapshot and replays its log, and every acknowledged write
/// is there. (A follower is down during the writes: while every member
/// keeps up the log is compacted without snapshots; the lagging one makes
/// the others snapshot, and comes back by the leader's snapshot.)
#[test]
fn the_whole_cluster_restarts_from_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    snapshotting(&mut c, 3_000);
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    let lagging = ids.into_iter().find(|&id| id != leader).unwrap();
    let addrs = c.client.clone();
    let recorded = with_clients(&addrs, 3, |_| {
        c.kill(lagging);
        bulk_sets(&c, leader, "r", 12_000, 16);
        c.start(lagging);
        eventually("every node snapshots", Duration::from_secs(30), || {
            ids.iter().all(|&id| {
                info_num(&c, id, "snapshot_index") >= 9_000
                    && info_num(&c, id, "purged_index") > 5_000
            })
        });
        for id in ids {
            c.kill(id);
        }
        for id in ids {
            c.start(id);
        }
        c.wait_leader(&ids);
        std::thread::sleep(Duration::from_millis(1500));
    });
    for id in ids {
        check_bulk(&c, id, "r", 12_000, 101);
    }
    assert_linearizable(&recorded);
}

/// A backup of a running cluster taken while clients write holds every
/// write acknowledged before it began; restored into a new three-node
/// cluster it serves them all. A damaged or foreign file is refused with a
/// clear error and seeds nothing.
#[test]
fn backup_of_a_running_cluster_restores_into_a_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = [1u64, 2, 3];
    let mut c = Cluster::new(tmp.path(), &ids);
    for id in ids {
        c.start(id);
    }
    let leader = c.wait_leader(&ids);
    bulk_sets(&c, leader, "b", 5_000, 64);
    let file = tmp.path().join("backup.rks");
    let follower = ids.iter().copied().find(|&id| id != leader).unwrap();
    let out = std::process::Command::new(BIN)
        .args([
            "backup",
            "--addr",
            &c.client[&follower].to_string(),
            "--out",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("backup of 5000 keys"), "{said}");

    // A new cluster in a new directory, restored from the file.
    let new_tmp = tempfile::tempdir().unwrap();
    let mut n = Cluster::new(new_tmp.path(), &ids);
    let restore = |n: &Cluster, id: u64, from: &Path| {
        let peers: Vec<(u64, std::net::SocketAddr)> = n
            .raft
            .iter()
            .filter(|(&p, _)| p != id)
            .map(|(&p, &a)| (p, a))
            .collect();
        let mut cmd = n.node_command(id, &peers);
        // `restore --from FILE` followed by the node's own options.
        let args: Vec<std::ffi::OsString> = cmd.get_args().skip(1).map(|a| a.to_owned()).collect();
        let mut r = std::process::Command::new(BIN);
        r.arg("restore").arg("--from").arg(from).args(args);
        let _ = &mut cmd;
        r.output().unwrap()
    };
    // Refused: a damaged copy and a foreign file.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let damaged = tmp.path().join("damaged.rks");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = restore(&n, 1, &damaged);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("damaged snapshot file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let foreign = tmp.path().join("foreign.rdb");
    std::fs::write(&foreign, b"REDIS0011\xfa\x09redis-ver").unwrap();
    let out = restore(&n, 1, &foreign);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a raft-kv snapshot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!new_tmp.path().join("node-1").join("log").exists());
    for id in ids {
        let out = restore(&n, id, &file);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A second restore into a seeded directory is refused.
    let out = restore(&n, 1, &file);
    assert!(!out.status.success());
    for id in ids {
        n.start(id);
    }
    let nl = n.wait_leader(&ids);
    for id in ids {
        check_bulk(&n, id, "b", 5_000, 7);
    }
    let size: u64 = redis::cmd("DBSIZE").query(&mut n.conn(nl)).unwrap();
    assert_eq!(size, 5_000);
    let _: () = redis::cmd("SET")
        .arg("after")
        .arg("restore")
        .query(&mut n.conn(nl))
        .unwrap();
    let start = Instant::now();
    eventually(
        "the write reaches every node",
        Duration::from_secs(10),
        || {
            ids.iter().all(|&id| {
                redis::cmd("GET")
                    .arg("after")
                    .query::<Option<String>>(&mut n.conn(id))
                    .ok()
                    .flatten()
                    .is_some()
            })
        },
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}
