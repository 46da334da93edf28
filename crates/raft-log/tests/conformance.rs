//! SledLogStore passes the LogStore conformance suite shipped by raft-core.

use async_trait::async_trait;
use raft_core::testing::{log_store_conformance, StoreFactory};
use raft_log::SledLogStore;

struct SledFactory {
    dirs: Vec<tempfile::TempDir>,
}

#[async_trait]
impl StoreFactory for SledFactory {
    type Store = SledLogStore;

    async fn fresh(&mut self) -> SledLogStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledLogStore::open(dir.path().join("log")).expect("open fresh store");
        self.dirs.push(dir);
        store
    }

    async fn reopen(&mut self, store: SledLogStore) -> SledLogStore {
        let path = store.path().to_path_buf();
        drop(store);
        SledLogStore::open(&path).expect("reopen store")
    }
}

#[tokio::test]
async fn sled_log_store_conforms() {
    log_store_conformance(SledFactory { dirs: Vec::new() }).await;
}
