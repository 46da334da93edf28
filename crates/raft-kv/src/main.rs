//! The `raft-kv` binary; see `raft-kv --help`.

fn main() -> std::process::ExitCode {
    raft_kv::cli::run()
}
