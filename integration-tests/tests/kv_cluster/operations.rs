//! What an operator meets: unsafe settings refused at start with a message
//! that says what to do, the password from a file or the environment, the
//! metrics and health endpoints, logs without colour codes (or as JSON),
//! and a SIGTERM that exits 0.

use crate::cluster::*;
use redis::{Commands, RedisResult};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a node command that must fail at start: its exit code and stderr.
/// `client` replaces the node's client address.
fn refused(
    c: &Cluster,
    id: u64,
    client: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("node")
        .args(["--id", &id.to_string()])
        .args(["--raft-addr", &c.raft[&id].to_string()])
        .args([
            "--client-addr",
            client.unwrap_or(&c.client[&id].to_string()),
        ])
        .arg("--data-dir")
        .arg(c.dir.join(format!("node-{id}")))
        .arg("--tls-dir")
        .arg(c.dir.join("certs"));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("the node started although it should have refused: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(unix)]
fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn unsafe_settings_are_refused_at_start_and_the_password_comes_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1]);
    // Protected mode: clients on every address, no password.
    let everywhere = format!("0.0.0.0:{}", free_tcp().port());
    let (code, err) = refused(&c, 1, Some(&everywhere), &[], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("protected mode") && err.contains("--password-file"),
        "{err}"
    );
    // A config file holding a password, readable by others.
    let conf = dir.path().join("node.toml");
    std::fs::write(&conf, "password = \"from-file\"\n").unwrap();
    chmod(&conf, 0o644);
    let (code, err) = refused(&c, 1, None, &["--config", conf.to_str().unwrap()], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    // A password file readable by others.
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "hunter2\n").unwrap();
    chmod(&pwfile, 0o640);
    let (code, err) = refused(
        &c,
        1,
        None,
        &["--password-file", pwfile.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    // A usage error is 2 (clap's).
    let (code, _) = refused(&c, 1, None, &["--protected-mode"], &[]);
    assert_eq!(code, Some(2));
    let (code, err) = refused(&c, 1, None, &["--protected-mode", "maybe"], &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("expected `yes` or `no`"), "{err}");

    // The password from a private file: clients must AUTH with it, and it
    // is not on the command line.
    chmod(&pwfile, 0o600);
    c.start_among(
        1,
        &[],
        &["--password-file".into(), pwfile.to_str().unwrap().into()],
    );
    let pid = c.procs[&1].id();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("hunter2"));
    let mut conn = c.conn(1);
    let denied: RedisResult<Option<String>> = conn.get("k");
    assert!(denied
        .unwrap_err()
        .to_string()
        .contains("Authentication required"));
    let ok: String = redis::cmd("AUTH").arg("hunter2").query(&mut conn).unwrap();
    assert_eq!(ok, "OK");
    eventually("a write", Duration::from_secs(20), || {
        conn.set::<_, _, String>("k", "v").is_ok()
    });
    c.kill(1);

    // The password from the environment.
    let mut cmd = c.node_command(1, &[]);
    let log = std::fs::File::create(dir.path().join("node-1.log")).unwrap();
    cmd.env("RAFT_KV_PASSWORD", "from-env")
        .stdout(Stdio::null())
        .stderr(log);
    c.procs.insert(1, cmd.spawn().unwrap());
    let mut conn = c.conn(1);
    let ok: String = redis::cmd("AUTH")
        .arg("default")
        .arg("from-env")
        .query(&mut conn)
        .unwrap();
    assert_eq!(ok, "OK");
    c.kill(1);
}

/// One HTTP GET: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    let code = got
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = got.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// The value of the first sample line that starts with `name`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_health_and_ready_are_served_and_sigterm_exits_zero_with_plain_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    let metrics: std::collections::BTreeMap<u64, SocketAddr> =
        [1, 2, 3].into_iter().map(|i| (i, free_tcp())).collect();
    for id in [1, 2, 3] {
        let mut args = vec!["--metrics-addr".to_string(), metrics[&id].to_string()];
        if id == 3 {
            args.extend(["--log-format".into(), "json".into()]);
        }
        c.start_among(id, &[1, 2, 3], &args);
    }
    let leader = c.wait_leader(&[1, 2, 3]);
    let follower = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    let mut conn = c.conn(leader);
    for i in 0..50 {
        let _: () = conn.set(format!("m{i}"), i).unwrap();
    }
    let _: Option<String> = conn.get("m1").unwrap();
    let (_, before) = http_get(metrics[&leader], "/metrics");
    let _: RedisResult<String> = redis::cmd("NOSUCH").query(&mut conn);
    let (code, text) = http_get(metrics[&leader], "/metrics");
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        sample(&text, "raftkv_raft_role{role=\"leader\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "raftkv_raft_role{role=\"follower\"}"),
        Some(0.0)
    );
    assert!(sample(&text, "raftkv_raft_term").unwrap() >= 1.0);
    assert!(sample(&text, "raftkv_raft_commit_index").unwrap() >= 50.0);
    assert!(sample(&text, "raftkv_raft_applied_index").unwrap() >= 50.0);
    assert!(sample(&text, "raftkv_raft_proposals_total").unwrap() >= 50.0);
    assert!(sample(&text, "raftkv_raft_commit_latency_seconds_count").unwrap() >= 50.0);
    assert!(sample(&text, "raftkv_log_save_seconds_count").unwrap() >= 1.0);
    assert!(sample(&text, "raftkv_raft_leader_changes_total").unwrap() >= 1.0);
    assert_eq!(
        sample(&text, "raftkv_commands_total{command=\"SET\"}"),
        Some(50.0)
    );
    // One unknown command, one error more (the client library sends
    // commands of its own when it connects).
    for name in [
        "raftkv_commands_total{command=\"other\"}",
        "raftkv_command_errors_total{code=\"ERR\"}",
    ] {
        let was = sample(&before, name).unwrap_or(0.0);
        assert_eq!(sample(&text, name), Some(was + 1.0), "{name}");
    }
    assert_eq!(sample(&text, "raftkv_client_connections"), Some(1.0));
    // Both peers are there; a quorum means at least one holds the 50 writes.
    let matched: Vec<f64> = [1, 2, 3]
        .into_iter()
        .filter(|&p| p != leader)
        .map(|peer| {
            let name = format!("raftkv_raft_peer_match_index{{peer=\"{peer}\"}}");
            sample(&text, &name).unwrap_or_else(|| panic!("no {name} in {text}"))
        })
        .collect();
    assert!(matched.iter().any(|&m| m >= 50.0), "{matched:?}");
    assert!(text.contains("# TYPE raftkv_log_save_seconds histogram"));
    let (code, text) = http_get(metrics[&follower], "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(&text, "raftkv_raft_role{role=\"follower\"}"),
        Some(1.0)
    );
    assert!(!text.contains("raftkv_raft_peer_match_index{"), "{text}");
    for id in [leader, follower] {
        assert_eq!(http_get(metrics[&id], "/health"), (200, "ok\n".into()));
        let (code, _) = http_get(metrics[&id], "/ready");
        assert_eq!(code, 200);
    }
    assert_eq!(http_get(metrics[&leader], "/nope").0, 404);
    // Garbage on the metrics port gets a 400, and the port goes on serving.
    let mut s = TcpStream::connect(metrics[&leader]).unwrap();
    s.write_all(b"\x00\x01\x02 nonsense\r\n\r\n").unwrap();
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert_eq!(http_get(metrics[&leader], "/health").0, 200);

    // With only one of three left, the survivor is alive but not ready.
    let survivor = 3;
    for id in [1, 2] {
        signal(&c, id, "-TERM");
        let mut p = c.procs.remove(&id).unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = p.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "node {id} did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(st.code(), Some(0), "node {id}: {st:?}");
    }
    let end = Instant::now() + Duration::from_secs(20);
    while http_get(metrics[&survivor], "/ready").0 != 503 {
        assert!(Instant::now() < end, "a node without a leader stays ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(metrics[&survivor], "/health").0, 200);
    signal(&c, survivor, "-INT");
    let mut p = c.procs.remove(&survivor).unwrap();
    assert_eq!(p.wait().unwrap().code(), Some(0));
    // Logs: plain text without colour codes when stderr is a file; JSON
    // lines with `--log-format json`.
    for id in [1, 2] {
        let log = std::fs::read_to_string(dir.path().join(format!("node-{id}.log"))).unwrap();
        assert!(log.contains("node started"), "{log}");
        assert!(!log.contains('\u{1b}'), "colour codes in a file: {log}");
    }
    let json = std::fs::read_to_string(dir.path().join("node-3.log")).unwrap();
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        // (A plain line from the process itself, outside the logger, starts
        // with "raft-kv:".)
        assert!(
            l.starts_with('{') && l.ends_with('}') || l.starts_with("raft-kv:"),
            "not a JSON log line: {l}"
        );
    }
    assert!(json.contains("\"message\":\"node started\""), "{json}");
}

#[test]
fn keys_and_values_never_reach_the_logs_at_debug() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1]);
    let mut cmd = c.node_command(1, &[]);
    let log = std::fs::File::create(dir.path().join("node-1.log")).unwrap();
    cmd.env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log);
    c.procs.insert(1, cmd.spawn().unwrap());
    c.wait_leader(&[1]);
    let mut conn = c.conn(1);
    let _: () = conn.set("secret-key-qzxjw", "secret-value-qzxjw").unwrap();
    let _: Option<String> = conn.get("secret-key-qzxjw").unwrap();
    let _: RedisResult<String> = redis::cmd("SET").arg("secret-key-qzxjw").query(&mut conn);
    let _: RedisResult<String> = redis::cmd("NOSUCH")
        .arg("secret-arg-qzxjw")
        .query(&mut conn);
    signal(&c, 1, "-TERM");
    let mut p = c.procs.remove(&1).unwrap();
    assert_eq!(p.wait().unwrap().code(), Some(0));
    let log = std::fs::read_to_string(dir.path().join("node-1.log")).unwrap();
    assert!(log.lines().count() > 5, "debug logging is on: {log}");
    // (Letters, not digits: timestamps and ports in the log are digits, and
    // a numeric marker turned up in them by chance.)
    assert!(!log.contains("qzxjw"), "a key or value was logged: {log}");
}

/// Runs redis-cli (Debian's redis-tools; `.ci/run` installs it) with
/// `args`; its stdout and stderr together.
fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli is needed for this test (apt-get install redis-tools)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn redis_cli_speaks_tls_to_the_client_port_with_and_without_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2]);
    let certs = dir.path().join("certs");
    let p = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let port = c.client[&1].port().to_string();
    c.start_among(
        1,
        &[],
        &[
            "--client-tls-cert".into(),
            p("node-1.pem"),
            "--client-tls-key".into(),
            p("node-1.key"),
        ],
    );
    let tls = |extra: &[String]| {
        let mut args: Vec<String> = vec![
            "--tls".into(),
            "--cacert".into(),
            p("ca.pem"),
            "-h".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.clone(),
        ];
        args.extend_from_slice(extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        redis_cli(&a)
    };
    let mut pong = String::new();
    eventually("a TLS PING", Duration::from_secs(20), || {
        pong = tls(&["PING".into()]);
        pong.trim() == "PONG"
    });
    eventually("a TLS SET", Duration::from_secs(20), || {
        tls(&["SET".into(), "t".into(), "1".into()]).trim() == "OK"
    });
    assert_eq!(tls(&["GET".into(), "t".into()]).trim(), "1");
    // Plain text to a TLS port gets no answer.
    let plain = redis_cli(&["-h", "127.0.0.1", "-p", &port, "PING"]);
    assert!(!plain.contains("PONG"), "{plain}");
    // The tools speak TLS too.
    let addr = c.client[&1].to_string();
    let tool = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let ca = p("ca.pem");
    let tls_args = ["--tls-ca", ca.as_str(), "--tls-server-name", "node-1.raft"];
    let member = [
        &["member", "--addr", addr.as_str()][..],
        &tls_args[..],
        &["list"],
    ]
    .concat();
    let (ok, out) = tool(&member);
    assert!(ok && out.contains('1'), "{out}");
    let file = dir.path().join("tls.rks");
    let backup = [
        &[
            "backup",
            "--addr",
            addr.as_str(),
            "--out",
            file.to_str().unwrap(),
        ][..],
        &tls_args[..],
    ]
    .concat();
    let (ok, out) = tool(&backup);
    assert!(ok && out.contains("written"), "{out}");
    // Without TLS, the tool fails with an error, not a hang.
    let (ok, out) = tool(&["member", "--addr", &addr, "list"]);
    assert!(!ok, "{out}");
    c.kill(1);
    // Client certificates required.
    c.start_among(
        1,
        &[],
        &[
            "--client-tls-cert".into(),
            p("node-1.pem"),
            "--client-tls-key".into(),
            p("node-1.key"),
            "--client-tls-ca".into(),
            p("ca.pem"),
        ],
    );
    let with_cert = [
        "--cert".to_string(),
        p("node-2.pem"),
        "--key".into(),
        p("node-2.key"),
    ];
    eventually(
        "a PING with a client certificate",
        Duration::from_secs(20),
        || {
            let mut a = with_cert.to_vec();
            a.push("PING".into());
            tls(&a).trim() == "PONG"
        },
    );
    let without = tls(&["PING".into()]);
    assert!(
        !without.contains("PONG"),
        "served without a certificate: {without}"
    );
    let (ok, out) = tool(&member);
    assert!(!ok, "a tool without a certificate was served: {out}");
    let (cert, key) = (p("node-2.pem"), p("node-2.key"));
    let with = [
        &member[..member.len() - 1],
        &["--tls-cert", &cert, "--tls-key", &key, "list"],
    ]
    .concat();
    let (ok, out) = tool(&with);
    assert!(ok && out.contains('1'), "{out}");
    c.kill(1);
}

#[test]
fn a_node_joins_a_cluster_whose_client_ports_serve_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2]);
    let certs = dir.path().join("certs");
    let p = |n: &str| certs.join(n).to_str().unwrap().to_string();
    let tls_for = |id: u64| -> Vec<String> {
        vec![
            "--client-tls-cert".into(),
            p(&format!("node-{id}.pem")),
            "--client-tls-key".into(),
            p(&format!("node-{id}.key")),
            "--client-tls-ca".into(),
            p("ca.pem"),
        ]
    };
    c.start_among(1, &[], &tls_for(1));
    let mut joiner = tls_for(2);
    joiner.extend([
        "--join".into(),
        c.client[&1].to_string(),
        "--join-tls-ca".into(),
        p("ca.pem"),
        "--join-tls-server-name".into(),
        "node-1.raft".into(),
    ]);
    c.start_among(2, &[], &joiner);
    // Node 2 presents its own certificate to node 1's port (which checks
    // client certificates), is added, caught up and promoted.
    let addr = c.client[&1].to_string();
    let (ca, cert, key) = (p("ca.pem"), p("node-2.pem"), p("node-2.key"));
    let list = || {
        let out = Command::new(BIN)
            .args(["member", "--addr", &addr, "--tls-ca", &ca])
            .args(["--tls-server-name", "node-1.raft", "--tls-cert", &cert])
            .args(["--tls-key", &key, "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut last = String::new();
    let end = Instant::now() + Duration::from_secs(60);
    while last.lines().filter(|l| l.contains(" voter")).count() < 2 {
        assert!(
            Instant::now() < end,
            "node 2 never became a voter: {last}\n{}",
            std::fs::read_to_string(dir.path().join("node-2.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
        last = list();
    }
}
