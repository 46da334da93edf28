//! Concurrent Redis clients whose histories the linearizability checker
//! judges: what each records, and how a reply is classified.

use redis::{Commands, Connection, RedisResult};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The registers the clients write (SET, MSET, CAS) and read (GET, MGET),
/// in pairs: MSET and MGET always cover one pair.
pub(crate) const REGISTER_PAIRS: [[&str; 2]; 2] = [["lin-a0", "lin-b0"], ["lin-a1", "lin-b1"]];

/// The counters the clients INCR, and read alone or together (MGET).
pub(crate) const COUNTERS: [&str; 2] = ["lin-n0", "lin-n1"];

/// Keys the clients write with an expiry (`SET ... PX`), overwrite without
/// one and read, so that the history has keys expiring while it is read.
pub(crate) const EXPIRING: [&str; 2] = ["lin-t0", "lin-t1"];

/// Every key the clients use that never expires.
pub(crate) fn client_keys() -> Vec<&'static str> {
    REGISTER_PAIRS
        .iter()
        .flatten()
        .chain(&COUNTERS)
        .copied()
        .collect()
}

/// What a client does with a reply: record the operation as acknowledged,
/// as of unknown outcome, or not at all; and whether to reconnect.
pub(crate) enum Verdict<T> {
    Acked(T),
    /// A write that may or may not have been applied.
    Unknown {
        reconnect: bool,
    },
    /// Known not to have happened (a read that failed, a write refused
    /// with -TRYAGAIN: the store's answer when it proposed nothing).
    Nothing {
        reconnect: bool,
    },
}

/// Classifies a reply by its Redis error code, never its text: for a write,
/// -TRYAGAIN says it was not proposed; -UNKNOWN, a broken connection or any
/// other error leave its outcome unknown. For a read any error means it did
/// not happen. A reply of the wrong type is a protocol bug and fails the test.
pub(crate) fn verdict<T>(res: RedisResult<T>, write: bool, what: &str) -> Verdict<T> {
    match res {
        Ok(v) => Verdict::Acked(v),
        Err(e) if e.kind() == redis::ErrorKind::TypeError => {
            panic!("{what}: a reply of the wrong type: {e}")
        }
        Err(e) if e.code() == Some("TRYAGAIN") => Verdict::Nothing { reconnect: false },
        Err(e) if write => Verdict::Unknown {
            reconnect: e.code() != Some("UNKNOWN"),
        },
        Err(_) => Verdict::Nothing { reconnect: true },
    }
}

/// A client thread, on any node, moving to another node when one fails:
/// SET, MSET over a pair, GET, MGET over a pair, CAS (expecting the value
/// this client last saw) on the registers, INCR and GET/MGET on the counters,
/// SET with and without `PX` and GET on the expiring keys, every written
/// value unique. Records every operation's outcome.
pub(crate) fn client_loop(
    addrs: &BTreeMap<u64, SocketAddr>,
    me: usize,
    start: Instant,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<integration_tests::linearizable::Op> {
    use integration_tests::linearizable::{Kind, Op, TxStep};
    let nodes: Vec<SocketAddr> = addrs.values().copied().collect();
    let mut out = Vec::new();
    let mut conn: Option<Connection> = None;
    let mut target = me;
    let mut seq = 0u64;
    // The value this client last saw each register hold (CAS expects it).
    let mut last_seen: BTreeMap<&str, String> = BTreeMap::new();
    let now = || start.elapsed().as_micros() as u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let Some(cn) = conn.as_mut() else {
            target += 1;
            let addr = nodes[target % nodes.len()];
            let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
            match client.get_connection_with_timeout(Duration::from_millis(500)) {
                Ok(cn) => {
                    cn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    cn.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                    conn = Some(cn);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            continue;
        };
        seq += 1;
        // A fixed, varied sequence per client (no RNG needed).
        let pick = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize + me;
        let pair = REGISTER_PAIRS[pick % 2];
        let one = pair[(pick / 2) % 2];
        let counter = COUNTERS[(pick / 4) % 2];
        let value = format!("c{me}-{seq}");
        let call = now();
        let (kind, verdict): (Kind, Verdict<()>) = if (pick / 8).is_multiple_of(6) {
            // An expiring key: set for 20-200 ms, overwritten without an
            // expiry, or read.
            let key = EXPIRING[(pick / 48) % 2];
            match (pick / 96) % 5 {
                0 | 1 => {
                    let ttl_ms = 20 + (pick as u64 / 480) % 180;
                    let res = redis::cmd("SET")
                        .arg(key)
                        .arg(&value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query::<String>(cn);
                    let kind = Kind::SetPx {
                        key: key.to_string(),
                        value: value.clone(),
                        ttl_ms,
                    };
                    (kind, map_verdict(verdict(res, true, "SET PX"), |_| {}))
                }
                2 => {
                    let v = verdict(cn.set::<_, _, String>(key, &value), true, "SET");
                    (Kind::set(key, &value), map_verdict(v, |_| {}))
                }
                _ => {
                    let mut got = None;
                    let v = map_verdict(
                        verdict(cn.get::<_, Option<String>>(key), false, "GET"),
                        |r| got = r,
                    );
                    (Kind::get(key, got.as_deref()), v)
                }
            }
        } else {
            match pick % 20 {
                // SET one register.
                0..=2 => {
                    let v = verdict(cn.set::<_, _, String>(one, &value), true, "SET");
                    let v = map_verdict(v, |_| {
                        last_seen.insert(one, value.clone());
                    });
                    (Kind::set(one, &value), v)
                }
                // MSET a pair.
                3..=5 => {
                    let res = redis::cmd("MSET")
                        .arg(pair[0])
                        .arg(&value)
                        .arg(pair[1])
                        .arg(&value)
                        .query::<String>(cn);
                    let v = map_verdict(verdict(res, true, "MSET"), |_| {
                        for k in pair {
                            last_seen.insert(k, value.clone());
                        }
                    });
                    let pairs = pair.iter().map(|k| (k.to_string(), value.clone()));
                    (Kind::Write(pairs.collect()), v)
                }
                // GET a register or a counter.
                6..=8 => {
                    let key = if pick % 20 == 8 { counter } else { one };
                    let mut got = None;
                    let v = map_verdict(
                        verdict(cn.get::<_, Option<String>>(key), false, "GET"),
                        |r| {
                            if let Some(r) = &r {
                                last_seen.insert(key, r.clone());
                            }
                            got = r;
                        },
                    );
                    (Kind::get(key, got.as_deref()), v)
                }
                // MGET a pair of registers or the counters.
                9..=11 => {
                    let keys = if pick % 20 == 11 { COUNTERS } else { pair };
                    let res = redis::cmd("MGET")
                        .arg(keys[0])
                        .arg(keys[1])
                        .query::<Vec<Option<String>>>(cn);
                    let mut got = vec![None, None];
                    let v = map_verdict(verdict(res, false, "MGET"), |r| {
                        assert_eq!(r.len(), 2, "MGET of two keys answered {r:?}");
                        for (k, v) in keys.iter().zip(&r) {
                            if let Some(v) = v {
                                last_seen.insert(k, v.clone());
                            }
                        }
                        got = r;
                    });
                    let pairs = keys.iter().map(|k| k.to_string()).zip(got);
                    (Kind::Read(pairs.collect()), v)
                }
                // INCR a counter.
                12..=15 => {
                    let res = redis::cmd("INCR").arg(counter).query::<i64>(cn);
                    let mut got = 0;
                    let v = map_verdict(verdict(res, true, "INCR"), |n| got = n);
                    (
                        Kind::Incr {
                            key: counter.to_string(),
                            value: got,
                        },
                        v,
                    )
                }
                // A transaction: INCR a counter, SET one register of the pair,
                // GET the other, at one instant.
                19 => {
                    let other = if pair[0] == one { pair[1] } else { pair[0] };
                    let res = redis::pipe()
                        .atomic()
                        .cmd("INCR")
                        .arg(counter)
                        .cmd("SET")
                        .arg(one)
                        .arg(&value)
                        .cmd("GET")
                        .arg(other)
                        .query::<(i64, String, Option<String>)>(cn);
                    let (mut n, mut got) = (0, None);
                    let v = map_verdict(verdict(res, true, "MULTI/EXEC"), |(i, _, g)| {
                        n = i;
                        last_seen.insert(one, value.clone());
                        if let Some(g) = &g {
                            last_seen.insert(other, g.clone());
                        }
                        got = g;
                    });
                    let steps = vec![
                        TxStep::Incr(counter.to_string(), n),
                        TxStep::Set(one.to_string(), value.clone()),
                        TxStep::Get(other.to_string(), got),
                    ];
                    (Kind::Tx(steps), v)
                }
                // CAS a register from the value this client last saw.
                _ => {
                    let expected = last_seen
                        .get(one)
                        .cloned()
                        .unwrap_or_else(|| "never-seen".to_string());
                    let res = redis::cmd("CAS")
                        .arg(one)
                        .arg(&expected)
                        .arg(&value)
                        .query::<i64>(cn);
                    let mut swapped = false;
                    let v = map_verdict(verdict(res, true, "CAS"), |n| {
                        assert!(n == 0 || n == 1, "CAS answered {n}");
                        swapped = n == 1;
                        if swapped {
                            last_seen.insert(one, value.clone());
                        }
                    });
                    let kind = Kind::Cas {
                        key: one.to_string(),
                        expected,
                        new: value.clone(),
                        swapped,
                    };
                    (kind, v)
                }
            }
        };
        let ret = now();
        match verdict {
            Verdict::Acked(()) => out.push(Op {
                kind,
                call,
                ret: Some(ret),
            }),
            Verdict::Unknown { reconnect } => {
                out.push(Op {
                    kind,
                    call,
                    ret: None,
                });
                if reconnect {
                    conn = None;
                }
            }
            Verdict::Nothing { reconnect } => {
                if reconnect {
                    conn = None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// Runs `f` on an acknowledged reply.
pub(crate) fn map_verdict<T>(v: Verdict<T>, f: impl FnOnce(T)) -> Verdict<()> {
    match v {
        Verdict::Acked(t) => {
            f(t);
            Verdict::Acked(())
        }
        Verdict::Unknown { reconnect } => Verdict::Unknown { reconnect },
        Verdict::Nothing { reconnect } => Verdict::Nothing { reconnect },
    }
}

/// What the clients recorded: operations timed in microseconds since
/// `origin_us` (itself microseconds of the Unix clock, which the store's
/// leaders stamp entries with).
pub(crate) struct History {
    pub(crate) ops: Vec<integration_tests::linearizable::Op>,
    pub(crate) origin_us: u64,
}

impl std::ops::Deref for History {
    type Target = [integration_tests::linearizable::Op];
    fn deref(&self) -> &Self::Target {
        &self.ops
    }
}

/// Runs `clients` client threads (see `client_loop`) while `faults` runs on
/// this thread (given the clients' time origin); returns every operation
/// they recorded once `faults` returns.
pub(crate) fn with_clients(
    addrs: &BTreeMap<u64, SocketAddr>,
    clients: usize,
    faults: impl FnOnce(Instant),
) -> History {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let start = Instant::now();
    let origin_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_micros() as u64;
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..clients)
            .map(|me| {
                let stop = &stop;
                s.spawn(move || client_loop(addrs, me, start, stop))
            })
            .collect();
        // Stop the clients however `faults` ends, a failed assertion included,
        // or the scope would wait for them forever.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        faults(start);
        drop(guard);
        let ops = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        History { ops, origin_us }
    })
}

/// Asserts that the clients got work of every kind done and that the whole
/// history (every key, multi-key operations included) is linearizable;
/// returns how many operations were acknowledged.
pub(crate) fn assert_linearizable(recorded: &History) -> usize {
    use integration_tests::linearizable::{check_with_clock, Kind, DEFAULT_BUDGET};
    let acked: Vec<_> = recorded.iter().filter(|o| o.ret.is_some()).collect();
    let count = |f: &dyn Fn(&Kind) -> bool| acked.iter().filter(|o| f(&o.kind)).count();
    let counts = [
        (
            "SET",
            count(&|k| matches!(k, Kind::Write(p) if p.len() == 1)),
        ),
        (
            "MSET",
            count(&|k| matches!(k, Kind::Write(p) if p.len() > 1)),
        ),
        (
            "GET",
            count(&|k| matches!(k, Kind::Read(p) if p.len() == 1)),
        ),
        (
            "MGET",
            count(&|k| matches!(k, Kind::Read(p) if p.len() > 1)),
        ),
        ("INCR", count(&|k| matches!(k, Kind::Incr { .. }))),
        ("MULTI/EXEC", count(&|k| matches!(k, Kind::Tx(_)))),
        ("CAS", count(&|k| matches!(k, Kind::Cas { .. }))),
        (
            "CAS that swapped",
            count(&|k| matches!(k, Kind::Cas { swapped: true, .. })),
        ),
        ("SET PX", count(&|k| matches!(k, Kind::SetPx { .. }))),
        (
            "GET of an expiring key that found it gone",
            count(
                &|k| matches!(k, Kind::Read(p) if EXPIRING.contains(&p[0].0.as_str()) && p[0].1.is_none()),
            ),
        ),
        (
            "GET of an expiring key that found it",
            count(
                &|k| matches!(k, Kind::Read(p) if EXPIRING.contains(&p[0].0.as_str()) && p[0].1.is_some()),
            ),
        ),
    ];
    println!(
        "{} operations recorded on {} keys ({} acknowledged: {counts:?}; {} of unknown outcome)",
        recorded.len(),
        client_keys().len(),
        acked.len(),
        recorded.len() - acked.len()
    );
    assert!(
        acked.len() > 500,
        "the clients should get work done: {}",
        acked.len()
    );
    for (what, n) in counts {
        assert!(n >= 10, "too few acknowledged {what}: {counts:?}");
    }
    let t = Instant::now();
    if let Err(e) = check_with_clock(&recorded.ops, recorded.origin_us, DEFAULT_BUDGET) {
        panic!("{e}");
    }
    println!("history checked in {:?}", t.elapsed());
    acked.len()
}
