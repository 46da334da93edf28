//! Durable appends to SledLogStore with batches of 1, 16 and 256 entries of
//! 256 bytes, next to the physical limit measured in the same run: write +
//! fdatasync of 256 bytes on a plain file in the same directory.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft_core::storage::LogBatch;
use raft_core::{Entry, EntryPayload, LogStore};
use raft_log::SledLogStore;
use std::io::Write;

fn bench(c: &mut Criterion) {
    let dir =
        tempfile::tempdir_in(std::env::var("RAFT_LOG_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("bench dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("durable_append");

    let mut f = std::fs::File::create(dir.path().join("raw")).unwrap();
    let block = [0x5au8; 256];
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_write_fdatasync_256B", |b| {
        b.iter(|| {
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
        })
    });

    let mut store = SledLogStore::open(dir.path().join("log")).unwrap();
    let mut next = 1u64;
    for batch in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(
            BenchmarkId::new("sled_entries_per_batch", batch),
            &batch,
            |b, &n| {
                b.iter(|| {
                    let entries: Vec<Entry> = (next..next + n)
                        .map(|index| Entry {
                            term: 1,
                            index,
                            payload: EntryPayload::Command(vec![7u8; 256].into()),
                        })
                        .collect();
                    next += n;
                    rt.block_on(store.save(LogBatch {
                        hard_state: None,
                        truncate_from: None,
                        entries,
                        membership: None,
                        ..Default::default()
                    }))
                    .unwrap();
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
