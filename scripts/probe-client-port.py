#!/usr/bin/env python3
"""Probes a raft-kv node's client port as a hostile client would and prints
what each probe cost the server (CPU seconds from /proc, RSS growth) and
what it answered.

    scripts/probe-client-port.py [--bin target/release/raft-kv] [--json]

It starts its own one-node store on loopback (a fresh temporary directory),
with a password for the pre-AUTH probes, runs the probes one after another,
and stops the node. Nothing here is a pass/fail test: the limits themselves
are tested in crates/raft-kv/tests/client_port.rs; this script measures what
they cost and is what the README's table is made with.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / (1 << 20)


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def bulk(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


def read_reply(s, timeout=60):
    """Reads until one whole reply (simple types, bulk or flat arrays)."""
    s.settimeout(timeout)
    buf = b""
    while True:
        try:
            chunk = s.recv(1 << 20)
        except socket.timeout:
            return buf
        if not chunk:
            return buf
        buf += chunk
        if complete(buf):
            return buf


def complete(buf):
    def one(at):
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None
        t = buf[at:at + 1]
        if t in (b"+", b"-", b":"):
            return end + 2
        n = int(buf[at + 1:end])
        if t == b"$":
            stop = end + 2 + max(n, 0) + (2 if n >= 0 else 0)
            return stop if len(buf) >= stop else None
        pos = end + 2
        for _ in range(max(n, 0)):
            pos = one(pos)
            if pos is None:
                return None
        return pos
    try:
        return one(0) is not None
    except ValueError:
        return True


def connect(port, password=None):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if password:
        s.sendall(bulk([b"AUTH", password.encode()]))
        assert read_reply(s).startswith(b"+OK"), "AUTH failed"
    return s


class Node:
    def __init__(self, binary, password):
        self.dir = tempfile.mkdtemp(prefix="raft-kv-probe-")
        self.port = free_port()
        subprocess.run([binary, "certs", "--dir", f"{self.dir}/certs", "--nodes", "1"],
                       check=True, stdout=subprocess.DEVNULL)
        pwfile = f"{self.dir}/pw"
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        os.chmod(pwfile, 0o600)
        args = [binary, "node", "--id", "1",
                "--raft-addr", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                "--client-addr", f"127.0.0.1:{self.port}",
                "--data-dir", f"{self.dir}/data", "--tls-dir", f"{self.dir}/certs"]
        # Older builds have no --password-file: the environment works for
        # both (it is read by clap) -- and the command line for the oldest.
        env = dict(os.environ, RAFT_KV_PASSWORD=password, RUST_LOG="warn")
        help_text = subprocess.run([binary, "node", "--help"], capture_output=True,
                                   text=True).stdout
        if "RAFT_KV_PASSWORD" not in help_text:
            args += ["--password", password]
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(f"{self.dir}/node.log", "w"))
        self.password = password
        end = time.time() + 30
        while time.time() < end:
            try:
                s = connect(self.port, password)
                s.sendall(bulk([b"SET", b"probe", b"1"]))
                if read_reply(s).startswith(b"+OK"):
                    s.close()
                    return
                s.close()
            except (OSError, AssertionError):
                pass
            time.sleep(0.1)
        raise SystemExit("the node did not start; see " + self.dir)

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def rss(self):
        return rss_mib(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def settle(node, secs=0.3):
    time.sleep(secs)


def probe_big_requests(node, results):
    """EXISTS with many 1 KiB keys: requests of 5.4, 10.8 and 21.6 MB sent
    in 64 KiB pieces; CPU until the answer."""
    for mb in (5.4, 10.8, 21.6):
        n = int(mb * 1e6 / 1030)
        req = bulk([b"EXISTS"] + [b"k" * 1024] * n)
        s = connect(node.port, node.password)
        settle(node)
        c0 = node.cpu()
        for i in range(0, len(req), 65536):
            s.sendall(req[i:i + 65536])
        r = read_reply(s, 120)
        c1 = node.cpu()
        s.close()
        results.append({"probe": f"one {mb} MB request in 64 KiB pieces",
                        "cpu_s": round(c1 - c0, 3), "reply": r[:40].decode(errors="replace")})


def probe_slow_loris(node, results):
    """32 MiB of finished arguments, then one byte every 2 ms for 5 s."""
    s = connect(node.port, node.password)
    head = bulk([b"EXISTS"] + [b"k" * 1024] * 32768)
    # Announce one more argument than sent, then trickle its bytes.
    head = head.replace(b"*32769\r\n", b"*32770\r\n", 1) + b"$1000000\r\n"
    s.sendall(head)
    settle(node, 1.0)
    c0 = node.cpu()
    t0 = time.time()
    try:
        while time.time() - t0 < 5:
            s.send(b"x")
            time.sleep(0.002)
        answered = "(still open)"
    except OSError:
        answered = "(closed by the server)"
    c1 = node.cpu()
    s.close()
    results.append({"probe": "32 MiB of arguments, then a byte every 2 ms for 5 s",
                    "cpu_s": round(c1 - c0, 3),
                    "cpu_pct": round(100 * (c1 - c0) / 5, 1), "reply": answered})


def probe_pre_auth(node, results):
    """A 21.6 MB request before AUTH."""
    n = int(21.6e6 / 1030)
    req = bulk([b"EXISTS"] + [b"k" * 1024] * n)
    s = connect(node.port)
    settle(node)
    c0 = node.cpu()
    sent = 0
    try:
        for i in range(0, len(req), 65536):
            s.sendall(req[i:i + 65536])
            sent += 65536
    except OSError:
        pass
    r = read_reply(s, 60)
    c1 = node.cpu()
    s.close()
    results.append({"probe": "a 21.6 MB request before AUTH",
                    "cpu_s": round(c1 - c0, 3), "sent_before_close_mb": round(sent / 1e6, 2),
                    "reply": r[:60].decode(errors="replace").strip()})


def probe_big_mget(node, results):
    """100 keys of 1 MiB, then a 916-byte MGET of all of them."""
    s = connect(node.port, node.password)
    v = b"v" * (1 << 20)
    for i in range(100):
        s.sendall(bulk([b"SET", b"big%06d" % i, v]))
        assert read_reply(s).startswith(b"+OK")
    settle(node, 1.0)
    r0 = node.rss()
    req = bulk([b"MGET"] + [b"big%06d" % i for i in range(100)])
    s.sendall(req)
    r = read_reply(s, 120)
    settle(node, 0.5)
    r1 = node.rss()
    s.close()
    results.append({"probe": f"a {len(req)}-byte MGET of 100 keys of 1 MiB",
                    "rss_growth_mib": round(r1 - r0, 1), "reply_bytes": len(r),
                    "reply": r[:50].decode(errors="replace").strip()})


def probe_idle(node, results, n=3000):
    """n idle connections."""
    settle(node, 1.0)
    r0 = node.rss()
    socks = []
    for _ in range(n):
        socks.append(socket.create_connection(("127.0.0.1", node.port)))
    # Every connection made a round trip, so the server holds all of them.
    for s in socks:
        s.sendall(b"PING\r\n")
    for s in socks:
        read_reply(s)
    settle(node, 1.0)
    r1 = node.rss()
    for s in socks:
        s.close()
    results.append({"probe": f"{n} idle connections (each sent one PING)",
                    "rss_growth_mib": round(r1 - r0, 1),
                    "per_connection_kib": round((r1 - r0) * 1024 / n, 1)})


def probe_unknown(node, results):
    s = connect(node.port, node.password)
    s.sendall(bulk([b"NOPE", b"a" * (4 << 20)]))
    r = read_reply(s)
    s.close()
    results.append({"probe": "an unknown command with a 4 MiB argument",
                    "error_bytes": len(r)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/raft-kv")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    except (ImportError, ValueError, OSError):
        pass
    results = []
    node = Node(a.bin, "probe-pw")
    try:
        # The idle probe first, on a fresh node: later probes leave freed
        # memory that would blur its RSS baseline.
        for p in (probe_idle, probe_big_requests, probe_slow_loris, probe_pre_auth,
                  probe_big_mget, probe_unknown):
            try:
                p(node, results)
            except Exception as e:  # a probe that kills the node says so
                results.append({"probe": p.__doc__.strip().splitlines()[0],
                                "failed": repr(e)})
            if node.proc.poll() is not None:
                results.append({"probe": "node", "failed": "the node exited"})
                node = Node(a.bin, "probe-pw")
    finally:
        node.stop()
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            rest = ", ".join(f"{k}={v}" for k, v in r.items() if k != "probe")
            print(f"{r['probe']}: {rest}")


if __name__ == "__main__":
    sys.exit(main())
