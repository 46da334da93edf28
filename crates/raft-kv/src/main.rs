//! The `raft-kv` binary; see `raft-kv --help`.

fn main() -> std::process::ExitCode {
    match raft_kv::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-kv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
