//! The `raft-kv` binary; see `raft-kv --help`.

// The store allocates and frees many small buffers per request (RESP
// arguments, commands, log entries, sled nodes); glibc's allocator spent
// about a sixth of the leader's CPU on them under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    raft_kv::cli::run()
}
