//! Durable appends of 256-byte entries in batches of 1, 16 and 256, on the
//! segment-file log and on the sled log side by side, next to the physical
//! limit measured in the same run: write + fdatasync of 256 bytes on a
//! plain file in the same directory. The stores live in the crate
//! directory, or in `RAFT_LOG_BENCH_DIR`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raft_core::storage::LogBatch;
use raft_core::{Entry, EntryPayload, LogStore};
use raft_log::SledLogStore;
use raft_log_wal::WalLogStore;
use std::io::Write;

fn appends<S: LogStore>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    name: &str,
    mut store: S,
) {
    let mut next = 1u64;
    for batch in [1u64, 16, 256] {
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, &n| {
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
                    entries,
                    ..Default::default()
                }))
                .unwrap();
            })
        });
    }
}

fn bench(c: &mut Criterion) {
    let dir =
        tempfile::tempdir_in(std::env::var("RAFT_LOG_BENCH_DIR").unwrap_or_else(|_| ".".into()))
            .expect("bench dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
    let wal = WalLogStore::open(dir.path().join("wal")).unwrap();
    appends(&mut g, &rt, "wal_entries_per_batch", wal);
    let sled = SledLogStore::open(dir.path().join("sled")).unwrap();
    appends(&mut g, &rt, "sled_entries_per_batch", sled);
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
