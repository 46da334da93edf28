//! Real Redis client libraries against a 3-node cluster: redis-py (the
//! most used Python client) with its defaults (RESP3 and HELLO) and in
//! RESP2, and through `HELLO 3 AUTH` on a cluster with a password; ioredis
//! (Node.js) with its defaults. The tours are in `integration-tests/clients/`;
//! `.ci/run` installs redis-py and ioredis.

use crate::cluster::*;
use std::process::Command;

const TOUR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/redis_py_tour.py");

fn tour(c: &Cluster, extra: &[&str]) {
    let addrs: Vec<String> = c.client.values().map(|a| a.to_string()).collect();
    let out = Command::new("python3")
        .arg(TOUR)
        .args(extra)
        .args(&addrs)
        .output()
        .expect("python3 is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named 'redis'"),
        "redis-py is needed for this test (pip install redis): {text}"
    );
    assert!(out.status.success(), "redis-py tour {extra:?}: {text}");
    assert!(text.contains("tour passed through 3 node(s)"), "{text}");
}

#[test]
fn redis_py_with_its_defaults_and_in_resp2() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        c.start(id);
    }
    c.wait_leader(&[1, 2, 3]);
    tour(&c, &[]);
    tour(&c, &["--protocol", "2"]);
}

#[test]
fn redis_py_authenticates_with_hello() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    c.extra = vec!["--password".into(), "tour-pw".into()];
    for id in [1, 2, 3] {
        c.start(id);
    }
    // (INFO needs AUTH here: wait for a leader through the tour's retries.)
    let mut last = String::new();
    for _ in 0..100 {
        let addrs: Vec<String> = c.client.values().map(|a| a.to_string()).collect();
        let out = Command::new("python3")
            .arg(TOUR)
            .args(["--password", "tour-pw"])
            .args(&addrs)
            .output()
            .expect("python3 is needed for this test");
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(last.contains("tour passed through 3 node(s)"), "{last}");
    // A wrong password is refused at HELLO.
    let addrs: Vec<String> = c.client.values().map(|a| a.to_string()).collect();
    let out = Command::new("python3")
        .arg(TOUR)
        .args(["--password", "wrong"])
        .args(&addrs[..1])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid username-password pair"), "{err}");
}

#[test]
fn ioredis_with_its_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::new(dir.path(), &[1, 2, 3]);
    for id in [1, 2, 3] {
        c.start(id);
    }
    c.wait_leader(&[1, 2, 3]);
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/clients");
    assert!(
        std::path::Path::new(clients)
            .join("node_modules/ioredis")
            .exists(),
        "ioredis is needed for this test: (cd integration-tests/clients && npm install)"
    );
    let addrs: Vec<String> = c.client.values().map(|a| a.to_string()).collect();
    let out = Command::new("node")
        .current_dir(clients)
        .arg("ioredis_tour.js")
        .args(&addrs)
        .output()
        .expect("node is needed for this test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ioredis tour: {text}");
    assert!(text.contains("tour passed through 3 node(s)"), "{text}");
}
