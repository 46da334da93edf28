//! The `raft-kv` command line, built inside this package so its tests can run
//! real node processes (`CARGO_BIN_EXE_kv_node`).

fn main() -> std::process::ExitCode {
    raft_kv::cli::run()
}
