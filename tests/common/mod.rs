//! Shared by the integration tests: a Weir server in-process on an ephemeral port.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use tokio_postgres::{Client, NoTls};
use weir::server::{Server, ServerConfig};

pub struct TestServer {
    pub server: Server,
    pub port: u16,
}

impl TestServer {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with_password(data_dir, None).await
    }

    pub async fn start_with_password(data_dir: &Path, password: Option<&str>) -> Self {
        let server = Server::start(ServerConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: data_dir.to_path_buf(),
            password: password.map(str::to_string),
        })
        .await
        .expect("server starts");
        let port = server.local_addr().port();
        Self { server, port }
    }

    pub async fn connect(&self) -> Client {
        connect(self.port).await
    }

    pub async fn stop(self) {
        self.server.shutdown().await.expect("clean shutdown");
    }
}

pub async fn connect(port: u16) -> Client {
    let (client, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=weir dbname=weir"),
        NoTls,
    )
    .await
    .expect("connects");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A client whose NOTICEs (SQLSTATE, message) arrive on the receiver, in order.
pub async fn connect_with_notices(
    port: u16,
) -> (
    Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    use futures::StreamExt;
    let (client, mut connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=weir dbname=weir"),
        NoTls,
    )
    .await
    .expect("connects");
    let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notice(notice) = message {
                let _ = tx.send((
                    notice.code().code().to_string(),
                    notice.message().to_string(),
                ));
            }
        }
    });
    (client, notices)
}

/// All rows of a simple-protocol query, each value as text ("NULL" for null).
pub async fn rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    try_rows(client, sql)
        .await
        .unwrap_or_else(|e| match e.as_db_error() {
            Some(db) => panic!("{sql}: {} ({})", db.message(), db.code().code()),
            None => panic!("{sql}: {e}"),
        })
}

/// Like [`rows`], with a query error as a result.
/// How many checkpoints SHOW CHECKPOINTS lists, and the bytes they wrote in all.
pub async fn checkpoint_totals(client: &Client) -> Result<(usize, u64), tokio_postgres::Error> {
    let listed = try_rows(client, "SHOW CHECKPOINTS").await?;
    let bytes = listed.iter().filter_map(|c| c[6].parse::<u64>().ok()).sum();
    Ok((listed.len(), bytes))
}

pub async fn try_rows(
    client: &Client,
    sql: &str,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    Ok(client
        .simple_query(sql)
        .await?
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// Rows as sorted " | "-joined lines, to compare results as multisets.
pub fn render(rows: Vec<Vec<String>>) -> Vec<String> {
    let mut out: Vec<String> = rows.into_iter().map(|r| r.join(" | ")).collect();
    out.sort();
    out
}

/// What differs between two sorted multisets, for the failure message.
pub fn diff(expected: &[String], actual: &[String]) -> String {
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for r in expected {
        *counts.entry(r).or_default() += 1;
    }
    for r in actual {
        *counts.entry(r).or_default() -= 1;
    }
    let mut out = format!("expected {} rows, got {}\n", expected.len(), actual.len());
    for (shown, (row, n)) in counts.into_iter().filter(|(_, n)| *n != 0).enumerate() {
        if shown == 20 {
            out.push_str("  ...\n");
            break;
        }
        let side = if n > 0 { "missing" } else { "extra  " };
        writeln!(out, "  {side} x{}: {row}", n.abs()).unwrap();
    }
    out
}

/// Seeds of a property test's cases: `WEIR_DIFF_SEED` alone, or `WEIR_DIFF_CASES` (else
/// `default_cases`) seeds from `base`.
pub fn case_seeds(base: u64, default_cases: u64) -> Vec<u64> {
    match std::env::var("WEIR_DIFF_SEED") {
        Ok(s) => vec![s.parse().expect("WEIR_DIFF_SEED is a number")],
        Err(_) => {
            let n = std::env::var("WEIR_DIFF_CASES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(default_cases);
            (0..n).map(|i| base + i).collect()
        }
    }
}

/// The `weir` binary as a child process.
pub struct WeirProcess {
    pub child: Child,
    pub port: u16,
}

impl WeirProcess {
    pub fn start(data_dir: &Path) -> Self {
        Self::start_with_env(data_dir, &[])
    }

    /// Starts it with extra environment variables (failpoints).
    pub fn start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::try_start_with_env(data_dir, env).expect("weir logs where it listens")
    }

    /// Starts it; `None` when it exits before it listens (a failpoint crashed it while
    /// it resumed its jobs).
    pub fn try_start_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Option<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("weir starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let Some(line) = lines.next() else {
                let _ = child.wait();
                return None;
            };
            let line = line.expect("readable log");
            if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Some(Self { child, port })
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill_9(self) {
        drop(self);
    }
}

/// SIGKILL on drop, so a test that fails half-way leaves no server running.
impl Drop for WeirProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU time of this process, all threads (for benchmarks).
pub fn cpu_time() -> std::time::Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The scratch directories of 'state.backend' = 'sled' under a data directory (one per
/// operator subtask that keeps state on disk), and the bytes of the files in them.
#[allow(dead_code)]
pub fn scratch_dirs(data_dir: &std::path::Path) -> (usize, u64) {
    let Ok(dirs) = std::fs::read_dir(data_dir.join("spill")) else {
        return (0, 0);
    };
    let mut count = 0;
    let mut bytes = 0;
    for dir in dirs.flatten() {
        count += 1;
        for file in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            bytes += file.metadata().map_or(0, |m| m.len());
        }
    }
    (count, bytes)
}

/// The process's peak resident set size so far (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
