//! Redis is the oracle: the same random command sequences go to a real
//! `redis-server` (Debian's package; `.ci/run` installs it) and to a
//! 3-node raft-kv cluster (each command to a random node), and every
//! reply must be the same bytes, in RESP2 and in RESP3.
//!
//! Commands covered: the strings, keys, expiry, hash, list, set and sorted set commands, and WATCH, with
//! their errors and edge cases (empty and binary values, negative and huge
//! numbers, overflow, wrong arity, unknown commands). Bounded in CI by
//! `RAFT_KV_DIFF_OPS` (default 3000 per protocol); a longer run:
//! `RAFT_KV_DIFF_OPS=200000 RAFT_KV_DIFF_SEED=7 cargo test -p
//! integration-tests --test kv_cluster differential -- --nocapture`.

use crate::cluster::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server(dir: &std::path::Path) -> (RedisServer, SocketAddr) {
    let addr = free_tcp();
    let child = Command::new("redis-server")
        .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is needed for this test (apt-get install redis-server)");
    let end = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (RedisServer(child), addr)
}

/// A raw RESP connection: one command, one whole reply (its bytes).
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    fn call(&mut self, args: &[Vec<u8>]) -> Vec<u8> {
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        self.s.write_all(&req).unwrap();
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(n) = raft_kv::resp::reply_len(&self.buf) {
                let reply = self.buf[..n].to_vec();
                self.buf.drain(..n);
                return reply;
            }
            let n = self.s.read(&mut chunk).expect("a reply");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A small deterministic generator (splitmix64).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
}

const VALUES: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "10",
    "42",
    "abc",
    "3.5",
    "-2.25",
    "0.1",
    "1e3",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    " 1",
    "hello world",
];
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "7",
    "-100",
    "9223372036854775807",
    "-9223372036854775808",
    "x",
    "1.5",
    "",
];
/// Increments that binary floats hold exactly: with others (0.1) Redis's
/// 80-bit long doubles print their own rounding noise ("1001.54999999999999999"
/// where raft-kv's f64 prints "1001.55"), a documented difference.
const FLOATS: &[&str] = &[
    "0.5", "1", "-2.25", "0.125", "1e3", "abc", "", "inf", "-0", "1.5e2",
];
const OFFSETS: &[&str] = &["0", "1", "3", "7", "-1", "x"];
const RANGES: &[&str] = &["0", "1", "2", "-1", "-2", "-10", "10", "100", "x"];

fn key(g: &mut Gen, binary: bool) -> Vec<u8> {
    match g.below(8) {
        0 if binary => vec![0, 0xff, b'k'],
        1 => b"".to_vec(),
        n => format!("k{}", n % 5).into_bytes(),
    }
}

fn value(g: &mut Gen) -> Vec<u8> {
    if g.below(20) == 0 {
        return vec![0, 1, 0xfe, b'\r', b'\n'];
    }
    g.pick(VALUES).as_bytes().to_vec()
}

/// Expiry times: far enough that no key expires during a run (except
/// times in the past, which expire a key at once on both sides), with
/// invalid ones among them.
const SECONDS: &[&str] = &["100", "1000", "5000", "0", "-5", "x", "9223372036854775807"];
/// The same in milliseconds.
const MILLIS: &[&str] = &[
    "100000",
    "1000000",
    "5000000",
    "0",
    "-5",
    "x",
    "9223372036854775807",
];

/// A time for a command whose unit is `ms` (milliseconds) or seconds.
fn time_arg(g: &mut Gen, name: &str) -> Vec<u8> {
    let ms = name.to_ascii_uppercase().starts_with('P');
    g.pick(if ms { MILLIS } else { SECONDS })
        .as_bytes()
        .to_vec()
}
/// Absolute times (the first one long past).
const WHEN: &[&str] = &["1", "4102444800", "99999999999", "-1", "x", "0"];

/// How the replies of a command are compared.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// Byte for byte.
    Exact,
    /// As sets of elements (KEYS: the order is the server's own).
    AsSet,
    /// SCAN's reply: the cursors alike (0), the keys as sets.
    AsSetOfSecond,
    /// Integers within this much of each other when both are positive: a
    /// time left or an expiry time, which raft-kv counts on the leader's
    /// clock as stamped on the entries, Redis on its own (the two differ
    /// by the milliseconds between them, and rounding to seconds can turn
    /// that into one).
    Near(i64),
}

/// SET's options, some of them invalid together or alone.
fn set_options(g: &mut Gen) -> Vec<Vec<u8>> {
    let b = |s: &str| s.as_bytes().to_vec();
    let mut out = Vec::new();
    for _ in 0..g.below(3) {
        match g.below(10) {
            0 => out.push(b("NX")),
            1 => out.push(b("XX")),
            2 => out.push(b("GET")),
            3 => out.push(b("KEEPTTL")),
            4 | 5 => {
                let o = g.pick(&["EX", "PX", "ex"]);
                out.push(b(o));
                out.push(time_arg(g, o));
            }
            6 => {
                // Not a time already past: SET keeps such a key (counted by
                // DBSIZE) until it is reaped, at a moment of each server's
                // own choosing.
                let o = g.pick(&["EXAT", "PXAT"]);
                out.push(b(o));
                let future = if o == "EXAT" {
                    ["4102444800", "99999999999"]
                } else {
                    ["4102444800000", "99999999999000"]
                };
                out.push(b(g.pick(&[future[0], future[1], "-1", "x", "0"])));
            }
            7 => out.push(b("EX")),
            _ => out.push(b(g.pick(&["PERSIST", "BOGUS"]))),
        }
    }
    out
}

/// One random command: its arguments, and how its replies are compared.
fn command(g: &mut Gen) -> (Vec<Vec<u8>>, Compare) {
    let b = |s: &str| s.as_bytes().to_vec();
    let k = key(g, true);
    let field = |g: &mut Gen| b(g.pick(&["f1", "f2", "f3", "", "F1"]));
    let elem = |g: &mut Gen| b(g.pick(&["a", "b", "c", "", "1", "2"]));
    let index = |g: &mut Gen| b(g.pick(&["0", "1", "-1", "2", "-3", "10", "-100", "x"]));
    let score = |g: &mut Gen| {
        b(g.pick(&[
            "1", "2", "-1", "0", "1.5", "-0.25", "inf", "-inf", "x", "1e3",
        ]))
    };
    let member = |g: &mut Gen| b(g.pick(&["a", "b", "c", "", "m1"]));
    let bound = |g: &mut Gen| b(g.pick(&["1", "(1", "-inf", "+inf", "(2", "0", "1.5", "x", "(x"]));
    let c: Vec<Vec<u8>> = match g.below(108) {
        // WATCH (the connection that watches also runs the next MULTI).
        104 | 105 => {
            let mut c = vec![b("WATCH"), k];
            if g.below(2) == 0 {
                c.push(key(g, true));
            }
            c
        }
        106 => vec![b("UNWATCH")],
        107 => vec![b("WATCH")],
        // Sorted sets, on the same keys again.
        90 | 91 => {
            let mut c = vec![b("ZADD"), k.clone()];
            for _ in 0..g.below(3) {
                c.push(b(g.pick(&["NX", "XX", "GT", "LT", "CH", "INCR"])));
            }
            c.push(score(g));
            c.push(member(g));
            if g.below(3) == 0 {
                c.push(score(g));
                c.push(member(g));
            }
            c
        }
        92 => vec![b("ZADD"), k, score(g)],
        93 => vec![b("ZREM"), k, member(g), member(g)],
        94 => vec![b("ZINCRBY"), k, score(g), member(g)],
        95 | 96 => vec![b("ZSCORE"), k, member(g)],
        97 => vec![b("ZCARD"), k],
        // (Not WITHSCORE: Redis 7.2's, and the oracle is Debian's 7.0.)
        98 => vec![b(g.pick(&["ZRANK", "ZREVRANK"])), k, member(g)],
        99 | 100 => {
            let mut c = vec![b("ZRANGE"), k, index(g), index(g)];
            if g.below(3) == 0 {
                c.push(b("REV"));
            }
            if g.below(2) == 0 {
                c.push(b("WITHSCORES"));
            }
            c
        }
        101 | 102 => {
            let mut c = vec![b("ZRANGE"), k, bound(g), bound(g), b("BYSCORE")];
            if g.below(2) == 0 {
                c.push(b("REV"));
            }
            if g.below(3) == 0 {
                c.extend([
                    b("LIMIT"),
                    b(g.pick(&["0", "1", "5"])),
                    b(g.pick(&["1", "2", "-1", "0"])),
                ]);
            }
            if g.below(2) == 0 {
                c.push(b("WITHSCORES"));
            }
            c
        }
        103 => {
            let mut c = vec![b("ZSCAN"), k, b("0")];
            if g.below(2) == 0 {
                c.push(b("MATCH"));
                c.push(b(g.pick(&["a*", "m?", "[ab]"])));
            }
            c
        }
        // Lists and sets, on the same keys again.
        70 | 71 => {
            let mut c = vec![b(g.pick(&["LPUSH", "RPUSH"])), k, elem(g)];
            if g.below(2) == 0 {
                c.push(elem(g));
            }
            c
        }
        72 | 73 => {
            let mut c = vec![b(g.pick(&["LPOP", "RPOP"])), k];
            if g.below(3) == 0 {
                c.push(b(g.pick(&["0", "1", "2", "10", "-1", "x"])));
            }
            c
        }
        74 | 75 => vec![b("LRANGE"), k, index(g), index(g)],
        76 => vec![b("LLEN"), k],
        77 => vec![b("LINDEX"), k, index(g)],
        78 => vec![b("LREM"), k, index(g), elem(g)],
        79 => vec![b("LTRIM"), k, index(g), index(g)],
        80 | 81 => {
            let mut c = vec![b("SADD"), k, elem(g)];
            if g.below(2) == 0 {
                c.push(elem(g));
            }
            c
        }
        82 => vec![b("SREM"), k, elem(g), elem(g)],
        83 => return (vec![b("SMEMBERS"), k], Compare::AsSet),
        84 => vec![b("SISMEMBER"), k, elem(g)],
        85 => vec![b("SCARD"), k],
        86 | 87 => {
            let name = g.pick(&["SINTER", "SUNION"]);
            return (vec![b(name), k, key(g, false)], Compare::AsSet);
        }
        88 => {
            let mut c = vec![b("SSCAN"), k, b("0")];
            if g.below(2) == 0 {
                c.push(b("MATCH"));
                c.push(b(g.pick(&["a*", "?", "[ab]"])));
            }
            return (c, Compare::AsSetOfSecond);
        }
        89 => vec![b("LPUSH"), k],
        // Hashes, on the same keys as strings: WRONGTYPE both ways.
        52 | 53 => {
            let mut c = vec![b(g.pick(&["HSET", "HMSET"])), k, field(g), value(g)];
            if g.below(2) == 0 {
                c.push(field(g));
                c.push(value(g));
            }
            c
        }
        54 => vec![b("HSETNX"), k, field(g), value(g)],
        55 => vec![b("HDEL"), k, field(g), field(g)],
        56 => vec![b("HINCRBY"), k, field(g), b(g.pick(NUMBERS))],
        // On a hash of its own, for the reason INCRBYFLOAT is (below).
        57 => vec![b("HINCRBYFLOAT"), b("hf"), field(g), b(g.pick(FLOATS))],
        58 | 59 => vec![b("HGET"), k, field(g)],
        60 => vec![b("HMGET"), k, field(g), field(g)],
        61 => vec![b("HGETALL"), k],
        62 => vec![b("HEXISTS"), k, field(g)],
        63 => vec![b("HLEN"), k],
        64 => vec![b("HKEYS"), k],
        65 => vec![b("HVALS"), k],
        66 => vec![b("HSTRLEN"), k, field(g)],
        67 => {
            let mut c = vec![b("HSCAN"), k, b(g.pick(&["0", "x"]))];
            if g.below(2) == 0 {
                c.push(b("MATCH"));
                c.push(b(g.pick(&["f*", "*2", "[fF]1"])));
            }
            c
        }
        68 => vec![b("HSET"), k, field(g)],
        69 => {
            let mut c = vec![b("SCAN"), b("0"), b("COUNT"), b("1000")];
            c.extend([b("TYPE"), b(g.pick(&["string", "hash", "HASH", "list"]))]);
            return (c, Compare::AsSetOfSecond);
        }
        40 | 41 => {
            let mut c = vec![b("SET"), k, value(g)];
            c.extend(set_options(g));
            c
        }
        42 => {
            let name = g.pick(&["SETEX", "PSETEX"]);
            vec![b(name), k, time_arg(g, name), value(g)]
        }
        43 => {
            let mut c = vec![b("GETEX"), k];
            match g.below(4) {
                0 => {}
                1 => c.push(b("PERSIST")),
                2 => {
                    let o = g.pick(&["EX", "PX", "EXAT", "PXAT"]);
                    c.push(b(o));
                    c.push(if o.ends_with("AT") {
                        b(g.pick(WHEN))
                    } else {
                        time_arg(g, o)
                    });
                }
                _ => c.push(b(g.pick(&["NX", "KEEPTTL", "EX"]))),
            }
            c
        }
        44 | 45 => {
            let name = g.pick(&["EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"]);
            let when = if name.ends_with("AT") {
                b(g.pick(WHEN))
            } else {
                time_arg(g, name)
            };
            let mut c = vec![b(name), k, when];
            for _ in 0..g.below(3) {
                c.push(b(g.pick(&["NX", "XX", "GT", "LT", "gt", "ZZ"])));
            }
            c
        }
        46 => vec![b("PERSIST"), k],
        47 | 48 => return (vec![b("TTL"), k], Compare::Near(1)),
        49 => return (vec![b("PTTL"), k], Compare::Near(1500)),
        50 => {
            let name = g.pick(&["EXPIRETIME", "PEXPIRETIME"]);
            let tol = if name == "EXPIRETIME" { 1 } else { 1500 };
            return (vec![b(name), k], Compare::Near(tol));
        }
        51 => vec![b("TTL"), k, b("extra")],
        34 | 35 => vec![b("MULTI")],
        36..=38 => vec![b("EXEC")],
        39 => vec![b("DISCARD")],
        0 => vec![b("SET"), k, value(g)],
        1 => vec![
            b("SET"),
            k,
            value(g),
            b(g.pick(&["NX", "XX", "nx", "BOGUS"])),
        ],
        2 | 3 => vec![b("GET"), k],
        4 => vec![b("MGET"), k, key(g, true), key(g, false)],
        5 => vec![b("MSET"), k, value(g), key(g, true), value(g)],
        6 => vec![b("DEL"), k, key(g, false)],
        7 => vec![b("UNLINK"), k],
        8 => vec![b("EXISTS"), k, key(g, true), k_again(g)],
        9 => vec![b("INCR"), k],
        10 => vec![b("DECR"), k],
        11 => vec![b("INCRBY"), k, b(g.pick(NUMBERS))],
        12 => vec![b("DECRBY"), k, b(g.pick(NUMBERS))],
        13 => vec![b("STRLEN"), k],
        14 => vec![b("APPEND"), k, value(g)],
        15 => vec![b("GETSET"), k, value(g)],
        16 => vec![b("GETDEL"), k],
        17 => vec![b("SETNX"), k, value(g)],
        18 => vec![b("SETRANGE"), k, b(g.pick(OFFSETS)), value(g)],
        19 => vec![b("GETRANGE"), k, b(g.pick(RANGES)), b(g.pick(RANGES))],
        20 => vec![b("MSETNX"), k, value(g), key(g, false), value(g)],
        21 => vec![b("RENAME"), k, key(g, true)],
        22 => vec![b("RENAMENX"), k, key(g, true)],
        23 => {
            let mut c = vec![b("COPY"), k, key(g, true)];
            if g.below(2) == 0 {
                c.push(b("REPLACE"));
            }
            c
        }
        24 => vec![b("TYPE"), k],
        25 => vec![b("DBSIZE")],
        // On a key of its own, with increments binary floats hold exactly:
        // raft-kv adds in f64, Redis in 80-bit long doubles printed with 17
        // decimals, and for other values (text left by APPEND, 0.1) the last
        // digits differ (a documented difference).
        26 => vec![b("INCRBYFLOAT"), b("kf"), b(g.pick(FLOATS))],
        27 => vec![b("ECHO"), value(g)],
        28 => vec![b("PING")],
        29 => vec![b(g.pick(&[
            "GET", "SET", "INCRBY", "GETRANGE", "APPEND", "MSET", "RENAME",
        ]))],
        30 => vec![b("NOSUCHCMD"), k],
        31 => {
            return (
                vec![
                    b("KEYS"),
                    b(g.pick(&["*", "k?", "k[0-2]", "k[^1]*", "\\*", "*k*"])),
                ],
                Compare::AsSet,
            )
        }
        32 => vec![b("SELECT"), b("0")],
        _ => vec![b("INCRBY"), k, b(g.pick(NUMBERS)), b("extra")],
    };
    (c, Compare::Exact)
}

/// An integer reply's value.
fn int_reply(reply: &[u8]) -> Option<i64> {
    std::str::from_utf8(reply.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
        .ok()?
        .parse()
        .ok()
}

fn k_again(g: &mut Gen) -> Vec<u8> {
    key(g, false)
}

/// The elements of a flat array reply, sorted (for KEYS).
fn sorted_elements(reply: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let end = reply.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
    let mut pos = end + 2;
    while pos < reply.len() {
        let n = raft_kv::resp::reply_len(&reply[pos..]).unwrap_or(reply.len() - pos);
        out.push(reply[pos..pos + n].to_vec());
        pos += n;
    }
    out.sort();
    out
}

fn run(resp3: bool, seed: u64, ops: usize, redis: SocketAddr, c: &Cluster) {
    let mut oracle = Raw::connect(redis);
    let mut nodes: Vec<Raw> = c.client.values().map(|&a| Raw::connect(a)).collect();
    if resp3 {
        let hello = vec![b"HELLO".to_vec(), b"3".to_vec()];
        oracle.call(&hello);
        for n in nodes.iter_mut() {
            n.call(&hello);
        }
    }
    // The same start on both sides.
    oracle.call(&[b"FLUSHALL".to_vec()]);
    nodes[0].call(&[b"FLUSHALL".to_vec()]);
    let mut g = Gen(seed);
    let mut history: Vec<String> = Vec::new();
    // A transaction belongs to its connection: MULTI ... EXEC go to one node,
    // and so do the WATCHes before them (Redis has one connection here,
    // raft-kv one per node; writes through any of them count as changes).
    let mut in_multi: Option<usize> = None;
    let mut watching: Option<usize> = None;
    for i in 0..ops {
        let (mut cmd, mut how) = command(&mut g);
        // Inside EXEC's reply only exact comparison works: KEYS's order is
        // the server's own, and times left may differ a little.
        while in_multi.is_some() && how != Compare::Exact {
            (cmd, how) = command(&mut g);
        }
        let tx_cmd = matches!(
            cmd[0].as_slice(),
            b"WATCH" | b"UNWATCH" | b"MULTI" | b"EXEC" | b"DISCARD"
        );
        let node = in_multi
            .or(if tx_cmd { watching } else { None })
            .unwrap_or_else(|| g.below(nodes.len()));
        match cmd[0].as_slice() {
            b"MULTI" => in_multi = Some(node),
            b"WATCH" if in_multi.is_none() && cmd.len() > 1 => watching = Some(node),
            b"EXEC" | b"DISCARD" => {
                if in_multi.is_some() {
                    watching = None;
                }
                in_multi = None;
            }
            b"UNWATCH" => watching = None,
            _ => {}
        }
        let want = oracle.call(&cmd);
        let got = nodes[node].call(&cmd);
        let shown: Vec<String> = cmd
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        history.push(format!("{shown:?}"));
        // Only aggregates are compared loosely: errors and the rest exactly.
        let aggregate = |r: &[u8]| matches!(r.first(), Some(b'*' | b'~' | b'%'));
        let how = if aggregate(&want) && aggregate(&got) || matches!(how, Compare::Near(_)) {
            how
        } else {
            Compare::Exact
        };
        let same = match how {
            Compare::Exact => want == got,
            Compare::AsSet => sorted_elements(&want) == sorted_elements(&got),
            Compare::AsSetOfSecond => {
                let (w, o) = (sorted_elements(&want), sorted_elements(&got));
                // [cursor, [keys]]: the nested array sorts after the cursor.
                w.len() == 2 && o.len() == 2 && {
                    let w: Vec<_> = w.iter().map(|x| sorted_elements(x)).collect();
                    let o: Vec<_> = o.iter().map(|x| sorted_elements(x)).collect();
                    w == o
                }
            }
            Compare::Near(tol) => match (int_reply(&want), int_reply(&got)) {
                (Some(w), Some(o)) if w >= 0 && o >= 0 => (w - o).abs() <= tol,
                _ => want == got,
            },
        };
        assert!(
            same,
            "RESP{} seed {seed}, command {i} {shown:?} (through node {}):\nredis:   {:?}\nraft-kv: {:?}\nlast commands: {:#?}",
            if resp3 { 3 } else { 2 },
            node,
            String::from_utf8_lossy(&want),
            String::from_utf8_lossy(&got),
            &history[history.len().saturating_sub(60)..]
        );
    }
}

#[test]
fn every_reply_matches_redis_in_resp2_and_resp3() {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, raddr) = redis_server(dir.path());
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        c.start(id);
    }
    c.wait_leader(&[1, 2, 3]);
    let ops = std::env::var("RAFT_KV_DIFF_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let seed = std::env::var("RAFT_KV_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    run(false, seed, ops, raddr, &c);
    run(true, seed + 1, ops, raddr, &c);
}
