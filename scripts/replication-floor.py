#!/usr/bin/env python3
# The best a durable 3-node replicated write can do on this machine, no Raft:
# a "leader" process appends 300 bytes to its file and fdatasyncs it while
# sending the record over UDP to two "follower" processes, which append +
# fdatasync and answer. A write is done when the leader's own fsync and one
# follower's answer are both in (majority of 3). Closed loop, one writer, no
# client connection, no encryption, no state machine: any real system is slower.
# Files go to $FLOOR_DIR (default: the current directory). Usage:
#   python3 scripts/replication-floor.py
import os, socket, time, multiprocessing as mp

DIR = os.environ.get('FLOOR_DIR', '.')
N = 3000
def follower(port, path):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', port))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    while True:
        data, addr = s.recvfrom(2048)
        if data == b'quit': break
        os.write(fd, data); os.fdatasync(fd)
        s.sendto(b'ok', addr)
    os.close(fd)
def leader(q):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0))
    fd = os.open(os.path.join(DIR, 'floor-leader.bin'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
    rec = b'x' * 300
    lat = []
    t0 = time.perf_counter()
    for i in range(N):
        t = time.perf_counter()
        s.sendto(rec, ('127.0.0.1', 47001)); s.sendto(rec, ('127.0.0.1', 47002))
        os.write(fd, rec); os.fdatasync(fd)
        s.recvfrom(16)                      # first follower ack = majority
        lat.append(time.perf_counter() - t)
        s.settimeout(0.0)                   # drain the slower follower's ack if it is there
        try:
            s.recvfrom(16)
        except BlockingIOError:
            pass
        s.settimeout(None)
    dt = time.perf_counter() - t0
    lat.sort()
    q.put((N / dt, lat[N // 2] * 1e6, lat[int(N * 0.99)] * 1e6))
    for p in (47001, 47002): s.sendto(b'quit', ('127.0.0.1', p))
fs = [mp.Process(target=follower, args=(47001 + i, os.path.join(DIR, f'floor-f{i}.bin'))) for i in range(2)]
[f.start() for f in fs]; time.sleep(0.3)
q = mp.Queue(); l = mp.Process(target=leader, args=(q,)); l.start(); l.join(); [f.join() for f in fs]
ops, p50, p99 = q.get()
print(f"durable 3-process replication floor: {ops:.0f} writes/s, p50 {p50:.0f} us, p99 {p99:.0f} us")
for f in ['floor-leader.bin', 'floor-f0.bin', 'floor-f1.bin']:
    os.remove(os.path.join(DIR, f))
