//! Real client programs against a real server: psql's meta-commands, and Python's
//! psycopg 3 (with a server-side cursor following a view through SUBSCRIBE) and
//! SQLAlchemy (tests/clients/python_clients.py).
//!
//! These need psql and the Python packages, which `.ci/run` installs. Where they are
//! missing outside CI the tests say so and pass; under CI (CI=true) they fail.

mod common;

use std::process::Command;

use common::TestServer;

/// Whether `program --version` runs; if not, fails under CI and skips elsewhere.
fn available(program: &str, args: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{program} is required under CI; .ci/run installs it"
        );
        eprintln!("skipping: {program} {} is not available", args.join(" "));
    }
    ok
}

fn psql(port: u16, command: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "weir",
            "weir",
            "-c",
            command,
        ])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "psql -c '{command}' failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim_end().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_describe_weir() {
    if !available("psql", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let port = server.port;
    psql(
        port,
        "CREATE TABLE trades (id BIGINT NOT NULL, symbol VARCHAR(8), price DOUBLE, ts TIMESTAMP(3), \
         PRIMARY KEY (id) NOT ENFORCED)",
    );
    psql(
        port,
        "CREATE VIEW symbols AS SELECT DISTINCT symbol FROM trades",
    );
    let out = tokio::task::spawn_blocking(move || {
        [r"\dt", r"\d trades", r"\dv", r"\l", r"\dn"].map(|c| psql(port, c))
    })
    .await
    .unwrap();
    assert_eq!(
        lines(&out[0]),
        vec![
            "         List of relations",
            " Schema |  Name  | Type  |  Owner",
            "--------+--------+-------+----------",
            " public | trades | table | postgres",
            "(1 row)",
            "",
        ]
    );
    assert_eq!(
        lines(&out[1]),
        vec![
            "                         Table \"public.trades\"",
            " Column |            Type             | Collation | Nullable | Default",
            "--------+-----------------------------+-----------+----------+---------",
            " id     | bigint                      |           | not null |",
            " symbol | text                        |           |          |",
            " price  | double precision            |           |          |",
            " ts     | timestamp without time zone |           |          |",
            "",
        ]
    );
    assert!(
        lines(&out[2]).contains(&" public | symbols | view | postgres".to_string()),
        "{}",
        out[2]
    );
    assert!(
        out[3].lines().any(|l| l.trim_start().starts_with("weir ")),
        "{}",
        out[3]
    );
    assert!(
        lines(&out[4]).contains(&" public | postgres".to_string()),
        "{}",
        out[4]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_and_sqlalchemy_work() {
    if !available("python3", &["-c", "import psycopg, sqlalchemy"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/python_clients.py"
    );
    let port = server.port.to_string();
    let out = tokio::process::Command::new("python3")
        .args([script, &port])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python clients failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
}
