//! QuicTransport over loopback: AppendEntries of 64 x 1 KiB entries (throughput),
//! and small-message round trips (criterion's mean, plus p50/p99 printed from
//! a separate run of 5000 round trips).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use raft_core::{Entry, EntryPayload, Message, MessageBody, NodeId, Transport};
use raft_net_quic::{ClusterCa, QuicConfig, QuicTransport};
use std::time::{Duration, Instant};

fn pair(rt: &tokio::runtime::Runtime) -> (QuicTransport, QuicTransport) {
    rt.block_on(async {
        let ca = ClusterCa::generate().unwrap();
        let mk = |id: NodeId, peer: NodeId| {
            let mut c = QuicConfig::new(id, "127.0.0.1:0".parse().unwrap());
            c.peers.insert(peer, "127.0.0.1:9".parse().unwrap());
            QuicTransport::bind(c, &ca.material(id).unwrap()).unwrap()
        };
        let a = mk(1, 2);
        let b = mk(2, 1);
        a.set_peer_addr(2, b.local_addr().unwrap()).unwrap();
        b.set_peer_addr(1, a.local_addr().unwrap()).unwrap();
        (a, b)
    })
}

fn append_msg() -> Message {
    let entries = (1..=64)
        .map(|i| Entry {
            term: 1,
            index: i,
            payload: EntryPayload::Command(vec![0xab; 1024].into()),
        })
        .collect();
    Message {
        from: 1,
        to: 2,
        term: 1,
        incarnation: 0,
        body: MessageBody::AppendEntries {
            prev_log_index: 0,
            prev_log_term: 0,
            entries,
            leader_commit: 0,
        },
    }
}

fn ping(round: u64) -> Message {
    Message {
        from: 1,
        to: 2,
        term: 1,
        incarnation: 0,
        body: MessageBody::Heartbeat {
            leader_commit: 0,
            round,
            purge_to_index: 0,
        },
    }
}

async fn round_trip(a: &mut QuicTransport, b: &mut QuicTransport, round: u64) {
    a.send(ping(round));
    let m = b.recv().await.unwrap();
    b.send(Message {
        from: 2,
        to: 1,
        term: 1,
        incarnation: 0,
        body: MessageBody::HeartbeatResponse { round: m.term },
    });
    a.recv().await.unwrap();
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut a, mut b) = pair(&rt);
    // Warm the connection up.
    rt.block_on(async {
        for r in 0..10 {
            round_trip(&mut a, &mut b, r).await;
        }
    });

    let mut g = c.benchmark_group("quic_loopback");
    const BATCH: u64 = 64;
    let msg = append_msg();
    let bytes = 64 * 1024 * BATCH;
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("append_64x1KiB", |bn| {
        bn.iter(|| {
            rt.block_on(async {
                for _ in 0..BATCH {
                    a.send(msg.clone());
                }
                for _ in 0..BATCH {
                    b.recv().await.unwrap();
                }
            })
        })
    });
    g.throughput(Throughput::Elements(1));
    let mut r = 100;
    g.bench_function("small_round_trip", |bn| {
        bn.iter(|| {
            r += 1;
            rt.block_on(round_trip(&mut a, &mut b, r))
        })
    });
    g.finish();

    let mut lat: Vec<Duration> = Vec::with_capacity(5000);
    rt.block_on(async {
        for i in 0..5000 {
            let t = Instant::now();
            round_trip(&mut a, &mut b, 1_000_000 + i).await;
            lat.push(t.elapsed());
        }
    });
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "small_round_trip over 5000: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
