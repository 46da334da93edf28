"""A tour of raft-kv with redis-py, the most used Python client, with its
default settings (RESP3 in redis-py 8) or `--protocol 2`:

    python3 redis_py_tour.py --protocol 3 HOST:PORT [HOST:PORT ...]

Connection commands, strings, transactions with WATCH, expiry, errors and client bookkeeping, through every
node given (writes through one node are read through the others). Exits
non-zero with the failing step on any difference from what Redis answers.
"""

import argparse
import sys
import time

import redis


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", type=int, default=None)
    ap.add_argument("--password", default=None)
    ap.add_argument("addrs", nargs="+")
    a = ap.parse_args()
    kw = {} if a.protocol is None else {"protocol": a.protocol}
    if a.password:
        kw["password"] = a.password
    clients = []
    for addr in a.addrs:
        host, port = addr.rsplit(":", 1)
        clients.append(redis.Redis(host=host, port=int(port), socket_timeout=10, **kw))
    r, others = clients[0], clients[1:] or clients[:1]
    proto = a.protocol or 3

    def text(v):
        return v.decode() if isinstance(v, bytes) else v

    def as_dict(v):
        if isinstance(v, dict):
            return {text(k): text(x) if not isinstance(x, (list, int)) else x for k, x in v.items()}
        return {text(v[i]): v[i + 1] if isinstance(v[i + 1], (list, int)) else text(v[i + 1])
                for i in range(0, len(v), 2)}

    def check(what, got, want):
        if got != want:
            print(f"FAILED {what}: got {got!r}, want {want!r}", file=sys.stderr)
            sys.exit(1)

    # Connection.
    check("ping", r.ping(), True)
    check("echo", r.echo("hi"), b"hi")
    hello = as_dict(r.execute_command("HELLO"))
    check("hello proto", hello["proto"], proto)
    check("hello server", hello["server"], "redis")
    check("client setname", r.client_setname("tour"), True)
    check("client getname", text(r.client_getname()), "tour")
    cid = r.client_id()
    check("client id is an int", isinstance(cid, int) and cid > 0, True)
    info = r.client_info()
    check("client info name", info.get("name"), "tour")
    check("client info resp", str(info.get("resp")), str(proto))
    names = [c.get("name") for c in r.client_list()]
    check("client list has us", "tour" in names, True)
    check("select 0", r.select(0) if hasattr(r, "select") else r.execute_command("SELECT", 0), True)
    if "raft_kv_version" in hello:
        # One database: SELECT 1 is refused (Redis has 16).
        try:
            r.execute_command("SELECT", 1)
            check("select 1 refused", False, True)
        except redis.ResponseError as e:
            check("select 1 error", "out of range" in str(e), True)
    secs, micros = r.time()
    check("time", abs(secs - time.time()) < 60 and 0 <= micros < 1_000_000, True)
    check("command count", r.command_count() > 10, True)
    check("info role", r.info().get("role") in ("leader", "follower", "master"), True)

    # Strings, through one node and read through the others.
    key = f"tour:{time.time_ns()}"
    check("set", r.set(key, "v1"), True)
    for o in others:
        check("get elsewhere", o.get(key), b"v1")
    check("set nx existing", r.set(key, "v2", nx=True), None)
    check("set xx", r.set(key, "v3", xx=True), True)
    check("mset", r.mset({key + ":a": "1", key + ":b": "2"}), True)
    check("mget", others[0].mget([key, key + ":a", key + ":missing"]), [b"v3", b"1", None])
    check("incr", r.incr(key + ":a"), 2)
    check("incrby", r.incrby(key + ":a", 40), 42)
    check("decr", r.decr(key + ":a"), 41)
    check("strlen", r.strlen(key), 2)
    check("exists", r.exists(key, key + ":a", key + ":missing"), 2)
    check("del", r.delete(key, key + ":missing"), 1)
    check("get deleted", others[0].get(key), None)
    try:
        r.incr(key + ":b" if False else key + ":s") and r.set(key + ":s", "x") and r.incr(key + ":s")
        check("incr on text refused", False, True)
    except redis.ResponseError as e:
        check("incr on text error", "not an integer" in str(e), True)
    try:
        r.execute_command("NOSUCHCOMMAND", "x")
        check("unknown command refused", False, True)
    except redis.ResponseError as e:
        check("unknown command error", "unknown command" in str(e), True)
    # A pipeline, and a transaction-free batch.
    p = r.pipeline(transaction=False)
    p.set(key + ":p", "1").incr(key + ":p").get(key + ":p")
    check("pipeline", p.execute(), [True, 2, b"2"])
    # A transaction: one log entry, applied at once on every node.
    p = r.pipeline(transaction=True)
    p.set(key + ":t1", "a").set(key + ":t2", "b").incr(key + ":t3").get(key + ":t1")
    check("multi/exec", p.execute(), [True, True, 1, b"a"])
    check("transaction seen elsewhere", others[-1].mget([key + ":t1", key + ":t2"]), [b"a", b"b"])
    check("getset", r.getset(key + ":t1", "z"), b"a")
    check("append", r.append(key + ":t1", "zz"), 3)
    check("getrange", r.getrange(key + ":t1", 0, 1), b"zz")
    check("setrange", r.setrange(key + ":t1", 1, "Q"), 3)
    check("incrbyfloat", r.incrbyfloat(key + ":f", 1.5), 1.5)
    check("rename", r.rename(key + ":t1", key + ":t9"), True)
    check("type", text(r.type(key + ":t9")), "string")
    check("keys", sorted(r.keys(key + ":t*")), [(key + ":t2").encode(), (key + ":t3").encode(), (key + ":t9").encode()])
    check("getdel", r.getdel(key + ":t9"), b"zQz")
    # Hashes.
    hk = key + ":h"
    check("hset", r.hset(hk, mapping={"a": "1", "b": "2"}), 2)
    check("hget elsewhere", others[-1].hget(hk, "a"), b"1")
    check("hgetall", r.hgetall(hk), {b"a": b"1", b"b": b"2"})
    check("hincrby", r.hincrby(hk, "a", 41), 42)
    check("hkeys", r.hkeys(hk), [b"a", b"b"])
    check("hdel", r.hdel(hk, "b", "zz"), 1)
    check("hlen", others[0].hlen(hk), 1)
    check("hscan_iter", dict(r.hscan_iter(hk)), {b"a": b"42"})
    check("type hash", text(r.type(hk)), "hash")
    try:
        r.get(hk)
        check("get on a hash refused", False, True)
    except redis.ResponseError as e:
        check("wrongtype", str(e).startswith("WRONGTYPE"), True)
    # Lists and sets.
    lk = key + ":l"
    check("rpush", r.rpush(lk, "a", "b", "c"), 3)
    check("lrange elsewhere", others[0].lrange(lk, 0, -1), [b"a", b"b", b"c"])
    check("lpop count", r.lpop(lk, 2), [b"a", b"b"])
    check("llen", r.llen(lk), 1)
    sk = key + ":set"
    check("sadd", r.sadd(sk, "x", "y", "x"), 2)
    check("smembers", others[-1].smembers(sk), {b"x", b"y"})
    check("sismember", bool(r.sismember(sk, "y")), True)
    zk = key + ":z"
    check("zadd", r.zadd(zk, {"a": 2, "b": 1, "c": 3}), 3)
    check("zrange withscores", others[0].zrange(zk, 0, -1, withscores=True), [(b"b", 1.0), (b"a", 2.0), (b"c", 3.0)])
    check("zincrby", r.zincrby(zk, 5, "b"), 6.0)
    check("zscore", r.zscore(zk, "b"), 6.0)
    check("zrange byscore rev", r.zrange(zk, 10, 2, byscore=True, desc=True), [b"b", b"c", b"a"])
    # WATCH: a write through another node between WATCH and EXEC aborts the
    # transaction (redis-py raises WatchError); without one it runs.
    wk = key + ":w"
    r.set(wk, "0")
    with r.pipeline() as p:
        p.watch(wk)
        check("watched value", p.get(wk), b"0")
        others[-1].set(wk, "other")
        p.multi()
        p.set(wk, "mine")
        try:
            p.execute()
            check("watch conflict aborts", False, True)
        except redis.WatchError:
            pass
    check("the other write stands", r.get(wk), b"other")
    with r.pipeline() as p:
        p.watch(wk, wk + ":absent")
        p.multi()
        p.incr(wk + ":n")
        p.set(wk, "mine")
        check("watch without conflict", p.execute(), [1, True])
    for o in others:
        check("seen elsewhere", o.get(wk), b"mine")
    check("unwatch", r.execute_command("UNWATCH") in (True, b"OK", "OK"), True)
    # Expiry: the leader's time, seen alike through every node.
    ek = key + ":e"
    check("set ex", r.set(ek, "x", ex=100), True)
    for o in others:
        check("ttl elsewhere", 98 <= o.ttl(ek) <= 100, True)
    check("pttl", 95_000 <= r.pttl(ek) <= 100_000, True)
    check("expire gt refused", r.expire(ek, 50, gt=True), False)
    check("expire lt", r.expire(ek, 50, lt=True), True)
    check("persist", r.persist(ek), True)
    check("ttl none", r.ttl(ek), -1)
    check("ttl missing", r.ttl(ek + ":missing"), -2)
    check("getex px", r.getex(ek, px=300), b"x")
    check("psetex", r.psetex(ek + ":2", 300, "y"), True)
    check("set get keepttl", r.set(ek + ":2", "z", keepttl=True, get=True), b"y")
    check("expireat past", r.set(ek + ":3", "q") and r.expireat(ek + ":3", 1), True)
    check("gone at once", [o.exists(ek + ":3") for o in clients], [0] * len(clients))
    time.sleep(1.5)
    check("expired everywhere", [o.get(ek) for o in clients], [None] * len(clients))
    check("expired too", [o.get(ek + ":2") for o in clients], [None] * len(clients))
    # SCAN through one node, with the cursor carried on through another.
    scanned = set()
    cursor = 0
    turn = 0
    while True:
        node = clients[turn % len(clients)]
        turn += 1
        cursor, batch = node.scan(cursor=cursor, match=key + ":*", count=3)
        scanned.update(batch)
        if cursor == 0:
            break
    check("scan", sorted(scanned), sorted(r.keys(key + ":*")))
    check("scan_iter", sorted(r.scan_iter(match=key + ":*", count=2)), sorted(scanned))
    # RESET returns the connection to RESP2 and forgets its name.
    conn = r.connection_pool.get_connection()
    conn.send_command("CLIENT", "SETNAME", "before-reset")
    conn.read_response()
    r.connection_pool.release(conn)
    print(f"redis-py {redis.__version__} RESP{proto}: tour passed through {len(clients)} node(s)")


if __name__ == "__main__":
    main()
