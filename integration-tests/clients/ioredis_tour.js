// A tour of raft-kv with ioredis (Node.js), with its default settings:
//
//     node ioredis_tour.js HOST:PORT [HOST:PORT ...]
//
// Connection commands, strings, a transaction, SCAN and errors, through
// every node given (writes through one node are read through the others).
// Exits non-zero with the failing step on any difference from what Redis
// answers.
"use strict";
const Redis = require("ioredis");
const assert = require("node:assert/strict");

async function main() {
  const addrs = process.argv.slice(2);
  const clients = addrs.map((a) => {
    const i = a.lastIndexOf(":");
    return new Redis({ host: a.slice(0, i), port: Number(a.slice(i + 1)), maxRetriesPerRequest: 3 });
  });
  const r = clients[0];
  const others = clients.length > 1 ? clients.slice(1) : clients;
  const step = async (what, f) => {
    try {
      await f();
    } catch (e) {
      console.error(`FAILED ${what}: ${e.message}`);
      process.exit(1);
    }
  };
  const key = `node-tour:${Date.now()}:${Math.random().toString(36).slice(2)}`;
  await step("ping", async () => assert.equal(await r.ping(), "PONG"));
  await step("client name", async () => {
    assert.equal(await r.client("SETNAME", "node-tour"), "OK");
    assert.equal(await r.client("GETNAME"), "node-tour");
    assert.ok((await r.client("LIST")).includes("name=node-tour"));
  });
  await step("set and get elsewhere", async () => {
    assert.equal(await r.set(key, "v1"), "OK");
    for (const o of others) assert.equal(await o.get(key), "v1");
  });
  await step("set nx / xx", async () => {
    assert.equal(await r.set(key, "v2", "NX"), null);
    assert.equal(await r.set(key, "v3", "XX"), "OK");
  });
  await step("mset / mget", async () => {
    assert.equal(await r.mset(`${key}:a`, "1", `${key}:b`, "2"), "OK");
    assert.deepEqual(await others[0].mget(key, `${key}:a`, `${key}:missing`), ["v3", "1", null]);
  });
  await step("counters", async () => {
    assert.equal(await r.incr(`${key}:a`), 2);
    assert.equal(await r.incrby(`${key}:a`, 40), 42);
    assert.equal(await r.decr(`${key}:a`), 41);
    assert.equal(await r.incrbyfloat(`${key}:f`, 2.5), "2.5");
  });
  await step("strings", async () => {
    assert.equal(await r.append(key, "!"), 3);
    assert.equal(await r.getrange(key, 0, 1), "v3");
    assert.equal(await r.strlen(key), 3);
    assert.equal(await r.getset(key, "new"), "v3!");
    assert.equal(await r.type(key), "string");
  });
  await step("transaction", async () => {
    const res = await r.multi().set(`${key}:t1`, "x").incr(`${key}:t2`).get(`${key}:t1`).exec();
    assert.deepEqual(res, [[null, "OK"], [null, 1], [null, "x"]]);
    assert.deepEqual(await others[others.length - 1].mget(`${key}:t1`, `${key}:t2`), ["x", "1"]);
  });
  await step("pipeline", async () => {
    const res = await r.pipeline().set(`${key}:p`, "1").incr(`${key}:p`).get(`${key}:p`).exec();
    assert.deepEqual(res, [[null, "OK"], [null, 2], [null, "2"]]);
  });
  await step("hashes", async () => {
    const hk = `${key}:h`;
    assert.equal(await r.hset(hk, "a", "1", "b", "2"), 2);
    assert.equal(await others[0].hget(hk, "b"), "2");
    assert.deepEqual(await r.hgetall(hk), { a: "1", b: "2" });
    assert.equal(await r.hincrby(hk, "a", 9), 10);
    assert.equal(await r.hdel(hk, "a"), 1);
    assert.deepEqual(await r.hkeys(hk), ["b"]);
    await assert.rejects(r.get(hk), /WRONGTYPE/);
  });
  await step("watch", async () => {
    const wk = `${key}:w`;
    // A second connection to the first node: WATCH belongs to a connection.
    const w = new Redis({ host: clients[0].options.host, port: clients[0].options.port });
    await w.set(wk, "0");
    await w.watch(wk);
    await others[others.length - 1].set(wk, "other");
    assert.equal(await w.multi().set(wk, "mine").exec(), null);
    assert.equal(await r.get(wk), "other");
    await w.watch(wk);
    assert.deepEqual(await w.multi().set(wk, "mine").exec(), [[null, "OK"]]);
    assert.equal(await others[0].get(wk), "mine");
    w.disconnect();
  });
  await step("expiry", async () => {
    const ek = `${key}:e`;
    assert.equal(await r.set(ek, "x", "EX", 100), "OK");
    for (const o of others) {
      const t = await o.ttl(ek);
      assert.ok(t >= 98 && t <= 100, `ttl ${t}`);
    }
    assert.equal(await r.expire(ek, 50, "GT"), 0);
    assert.equal(await r.persist(ek), 1);
    assert.equal(await r.ttl(ek), -1);
    assert.equal(await r.pexpire(ek, 300), 1);
    await new Promise((ok) => setTimeout(ok, 1500));
    for (const c of clients) assert.equal(await c.get(ek), null);
  });
  await step("scan", async () => {
    const seen = new Set();
    await new Promise((resolve, reject) => {
      const s = r.scanStream({ match: `${key}*`, count: 2 });
      s.on("data", (keys) => keys.forEach((k) => seen.add(k)));
      s.on("end", resolve);
      s.on("error", reject);
    });
    const all = (await r.keys(`${key}*`)).sort();
    assert.deepEqual([...seen].sort(), all);
  });
  await step("errors", async () => {
    await assert.rejects(r.call("NOSUCHCOMMAND", "x"), /unknown command/);
    await r.set(`${key}:s`, "text");
    await assert.rejects(r.incr(`${key}:s`), /not an integer/);
  });
  await step("del", async () => {
    assert.equal(await r.del(key, `${key}:missing`), 1);
    assert.equal(await others[0].exists(key), 0);
  });
  for (const c of clients) c.disconnect();
  console.log(`ioredis ${require("ioredis/package.json").version}: tour passed through ${clients.length} node(s)`);
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack}`);
  process.exit(1);
});
