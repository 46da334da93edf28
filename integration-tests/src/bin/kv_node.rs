//! The `raft-kv` command line, built inside this package so its tests can run
//! real node processes (`CARGO_BIN_EXE_kv_node`).

fn main() -> std::process::ExitCode {
    match raft_kv::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-kv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
