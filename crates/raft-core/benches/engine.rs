//! A 3-node cluster driven through the engine alone: no I/O, instant disks,
//! messages moved in memory. Measures proposals per second with 1 and with 256
//! proposals outstanding.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft_core::{Config, Engine, InitialState, LogIndex, Membership, Message, NodeId};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

struct Cluster {
    nodes: BTreeMap<NodeId, Engine>,
    wire: VecDeque<Message>,
    now: Duration,
    leader: NodeId,
}

impl Cluster {
    fn new() -> Self {
        let voters = [1, 2, 3];
        let nodes = voters
            .iter()
            .map(|&id| {
                let init = InitialState {
                    membership: Membership::new(voters),
                    ..Default::default()
                };
                (
                    id,
                    Engine::new(Config::new(id), init, id, Duration::ZERO).unwrap(),
                )
            })
            .collect();
        let mut c = Cluster {
            nodes,
            wire: VecDeque::new(),
            now: Duration::ZERO,
            leader: 1,
        };
        let d = c.nodes[&1].next_deadline();
        c.now = d;
        c.nodes.get_mut(&1).unwrap().tick(d);
        c.run();
        assert!(c.nodes[&1].is_leader());
        c
    }

    /// Processes readies and messages until quiet.
    fn run(&mut self) {
        loop {
            let mut any = false;
            for e in self.nodes.values_mut() {
                while e.has_ready() {
                    any = true;
                    let rd = e.take_ready();
                    if let Some(l) = rd.last_entry() {
                        e.persisted(l);
                    }
                    self.wire.extend(rd.messages);
                    self.wire.extend(rd.persisted_messages);
                }
            }
            while let Some(m) = self.wire.pop_front() {
                any = true;
                let to = m.to;
                self.nodes.get_mut(&to).unwrap().handle_message(self.now, m);
            }
            if !any {
                return;
            }
        }
    }

    fn commit(&self) -> LogIndex {
        self.nodes[&self.leader].commit_index()
    }

    /// Commits `n` proposals keeping `outstanding` in flight.
    fn drive(&mut self, n: u64, outstanding: u64, payload: &[u8]) {
        let target = self.nodes[&self.leader].last_log_id().index + n;
        let mut proposed = self.nodes[&self.leader].last_log_id().index;
        while self.commit() < target {
            let leader = self.nodes.get_mut(&self.leader).unwrap();
            while proposed < target && proposed - leader.commit_index() < outstanding {
                leader.propose(payload.to_vec()).unwrap();
                proposed += 1;
            }
            self.run();
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_3_nodes");
    let payload = vec![7u8; 256];
    for outstanding in [1u64, 256] {
        const N: u64 = 4096;
        g.throughput(Throughput::Elements(N));
        g.bench_with_input(
            BenchmarkId::new("proposals_outstanding", outstanding),
            &outstanding,
            |b, &o| {
                b.iter_batched(
                    Cluster::new,
                    |mut cl| cl.drive(N, o, &payload),
                    criterion::BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
