//! Data and catalog survive a clean restart and a kill -9, and no statement is ever
//! half-applied.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{rows, TestServer, WeirProcess};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_and_rows_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT NOT NULL, name STRING, pt AS PROCTIME(), PRIMARY KEY (id) NOT ENFORCED);
             CREATE TABLE k (x INT) WITH ('connector' = 'blackhole');
             INSERT INTO t VALUES (1, 'one'), (2, 'two');
             INSERT INTO t VALUES (3, 'three');
             CREATE VIEW v AS SELECT count(*) AS n FROM t;",
        )
        .await
        .unwrap();
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(
        rows(&client, "SELECT id, name FROM t ORDER BY id").await,
        vec![vec!["1", "one"], vec!["2", "two"], vec!["3", "three"]]
            .into_iter()
            .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        rows(&client, "SELECT n FROM v").await,
        vec![vec!["3".to_string()]]
    );
    assert_eq!(
        rows(&client, "SHOW TABLES").await,
        vec![
            vec!["k".to_string(), "table".into(), "blackhole".into()],
            vec!["t".to_string(), "table".into(), "log".into()],
            vec!["v".to_string(), "view".into(), "NULL".into()],
        ]
    );
    // Table ids keep counting after a restart: a new table never sees old rows.
    client
        .batch_execute("DROP VIEW v; DROP TABLE t; CREATE TABLE t (id BIGINT)")
        .await
        .unwrap();
    assert_eq!(
        rows(&client, "SELECT count(*) FROM t").await,
        vec![vec!["0".to_string()]]
    );
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(
        rows(&client, "SELECT count(*) FROM t").await,
        vec![vec!["0".to_string()]]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_insert_and_never_half_a_statement() {
    const ROWS_PER_STATEMENT: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    client
        .batch_execute("CREATE TABLE t (stmt BIGINT NOT NULL, i BIGINT NOT NULL)")
        .await
        .unwrap();

    // Writers append statements of ROWS_PER_STATEMENT rows until the server dies.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = vec![];
    for _ in 0..3 {
        let (acknowledged, next, port) = (acknowledged.clone(), next.clone(), weir.port);
        writers.push(tokio::spawn(async move {
            let client = common::connect(port).await;
            let mut mine = vec![];
            loop {
                let stmt = next.fetch_add(1, Ordering::SeqCst);
                let sql = format!(
                    "INSERT INTO t SELECT {stmt}, value FROM generate_series(1, {ROWS_PER_STATEMENT})"
                );
                match client.simple_query(&sql).await {
                    Ok(_) => {
                        mine.push(stmt);
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => return mine,
                }
            }
        }));
    }
    while acknowledged.load(Ordering::SeqCst) < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    weir.kill_9();
    let mut acked = vec![];
    for w in writers {
        acked.extend(w.await.unwrap());
    }

    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    let counts = rows(
        &client,
        "SELECT stmt, count(*), count(DISTINCT i) FROM t GROUP BY stmt",
    )
    .await;
    let present: std::collections::HashMap<u64, (u64, u64)> = counts
        .iter()
        .map(|r| {
            (
                r[0].parse().unwrap(),
                (r[1].parse().unwrap(), r[2].parse().unwrap()),
            )
        })
        .collect();
    for (stmt, (count, distinct)) in &present {
        assert_eq!(
            (*count, *distinct),
            (ROWS_PER_STATEMENT, ROWS_PER_STATEMENT),
            "statement {stmt} is half applied or doubled"
        );
    }
    for stmt in &acked {
        assert!(
            present.contains_key(stmt),
            "acknowledged statement {stmt} was lost"
        );
    }
    assert!(acked.len() >= 30);
    weir.kill_9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    client
        .batch_execute("CREATE TABLE t (a INT); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &weir.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = weir.child.wait().unwrap();
    assert!(exit.success(), "weir exited with {exit}");
    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    assert_eq!(
        rows(&client, "SELECT a FROM t").await,
        vec![vec!["1".to_string()]]
    );
    weir.kill_9();
}

/// State that only grows is checkpointed incrementally for good (each change written
/// once, no whole state rewritten as it doubles), and a restart restores it from the
/// first whole snapshot and every incremental one since.
/// A table of keys and a view counting rows per key, committed only by FLUSH (and the
/// periodic epoch already waiting).
const COUNTS_PER_KEY: &str = "SET 'execution.checkpointing.interval' = '1 h';
     CREATE TABLE t (k BIGINT);
     CREATE MATERIALIZED VIEW counts AS SELECT k, count(*) AS n FROM t GROUP BY k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_state_is_written_once_and_restored_from_its_increments() {
    const BATCHES: i64 = 12;
    const KEYS: i64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client.batch_execute(COUNTS_PER_KEY).await.unwrap();
    // The periodic epoch already waiting comes first; after it, only FLUSH commits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for b in 0..BATCHES {
        let values: Vec<String> = (b * KEYS..(b + 1) * KEYS)
            .map(|k| format!("({k})"))
            .collect();
        client
            .batch_execute(&format!(
                "INSERT INTO t VALUES {}; FLUSH",
                values.join(", ")
            ))
            .await
            .unwrap();
    }
    let written: Vec<i64> = rows(&client, "SHOW CHECKPOINTS")
        .await
        .iter()
        .filter(|c| c[1] == "materialized view counts" && c[8] == "COMPLETED")
        .map(|c| c[6].parse().unwrap())
        .filter(|&bytes| bytes > 100_000)
        .collect();
    assert!(written.len() >= BATCHES as usize, "{written:?}");
    // Each checkpoint wrote about one batch's keys: the first a whole snapshot of them,
    // the others their changes (a whole rewrite at 4 or 9 batches would be 4-9 times).
    let (least, most) = (written.iter().min().unwrap(), written.iter().max().unwrap());
    assert!(*most <= 2 * *least, "{written:?}");
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    let total = (BATCHES * KEYS).to_string();
    assert_eq!(
        rows(&client, "SELECT count(*), sum(n) FROM counts").await,
        vec![vec![total.clone(), total]]
    );
    // The group state came back too: old keys count on from where they were.
    client
        .batch_execute("INSERT INTO t VALUES (7), (7), (239999), (240000); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        rows(
            &client,
            "SELECT k, n FROM counts WHERE k IN (7, 239999, 240000) ORDER BY k"
        )
        .await,
        vec![vec!["7", "3"], vec!["239999", "2"], vec!["240000", "1"]]
            .into_iter()
            .map(|r| r.into_iter().map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

/// A join holding megabytes of rows: its checkpoint stores them in chunks of their own
/// (not in the epoch's entry of the task), and after a kill -9 they come back with the
/// rest of its state: the rows of both inputs match what arrives after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_join_state_goes_to_chunks_and_comes_back_after_kill_9() {
    const ROWS: i64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    client
        .batch_execute(&format!(
            "SET 'execution.checkpointing.interval' = '1 h';
             CREATE TABLE a (k BIGINT, pad VARCHAR);
             CREATE TABLE b (k BIGINT, tag VARCHAR);
             CREATE MATERIALIZED VIEW matched AS
               SELECT b.tag, count(*) AS n, sum(length(a.pad)) AS padding
               FROM a JOIN b ON a.k = b.k GROUP BY b.tag;
             INSERT INTO a SELECT value, repeat('x', 100) FROM generate_series(1, {ROWS});
             INSERT INTO b VALUES (1, 'before'), ({ROWS}, 'before');
             FLUSH"
        ))
        .await
        .unwrap();
    let expected = |rows: &[(&str, i64)]| -> Vec<Vec<String>> {
        rows.iter()
            .map(|(tag, n)| vec![tag.to_string(), n.to_string(), (n * 100).to_string()])
            .collect()
    };
    let read = "SELECT tag, n, padding FROM matched ORDER BY tag";
    assert_eq!(rows(&client, read).await, expected(&[("before", 2)]));
    weir.kill_9();

    // The join's checkpoint names chunks of its rows (their 2 MB in the store) instead
    // of holding them.
    let store = weir_catalog::SledStore::open(&dir.path().join("store")).unwrap();
    let view = weir::stream::checkpoint::store::Checkpoints::new(Arc::new(store), "view/matched");
    let meta = view.latest().unwrap().expect("a committed epoch");
    let chunked: u64 = view
        .load(&meta)
        .unwrap()
        .iter()
        .flat_map(|task| task.operators.iter().flatten())
        .map(|part| match part {
            weir::stream::checkpoint::StatePart::Stored(c) if c.joined() => c.bytes,
            _ => 0,
        })
        .sum();
    assert!(chunked > 2_000_000, "{chunked} bytes in chunks");
    drop(view);

    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    assert_eq!(rows(&client, read).await, expected(&[("before", 2)]));
    // Both inputs' rows came back: new rows of b find a's, and of a find b's.
    client
        .batch_execute(&format!(
            "INSERT INTO b SELECT value, 'after' FROM generate_series(1, {ROWS}, 2);
             INSERT INTO a VALUES ({ROWS}, repeat('y', 100));
             FLUSH"
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&client, read).await,
        expected(&[("after", ROWS / 2), ("before", 3)])
    );
    weir.kill_9();
}

/// An updating view whose every key changes at every epoch: its stored changes outgrow
/// it within two epochs and fold into its base; a restart reads that base and the
/// epochs after it, and goes on counting from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updating_views_folded_changes_restore_its_rows() {
    const KEYS: i64 = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client.batch_execute(COUNTS_PER_KEY).await.unwrap();
    let values: Vec<String> = (0..KEYS).map(|k| format!("({k})")).collect();
    let insert = format!("INSERT INTO t VALUES {}; FLUSH", values.join(", "));
    let summary = "SELECT count(*), sum(n), min(n), max(n) FROM counts";
    let expected = |rounds: i64| {
        vec![vec![
            KEYS.to_string(),
            (KEYS * rounds).to_string(),
            rounds.to_string(),
            rounds.to_string(),
        ]]
    };
    // The changes fold when they pass the view's rows by 64 Ki: 40 k inserts, then
    // 80 k -U/+U an epoch: folds after rounds 2, 4 and 6, and round 7's stay.
    for _ in 0..7 {
        client.batch_execute(&insert).await.unwrap();
    }
    assert_eq!(rows(&client, summary).await, expected(7));
    server.stop().await;
    assert_eq!(view_entries_since_base(dir.path()), 1);

    // Round 8 after a restart: with round 7's, past the fold size.
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(rows(&client, summary).await, expected(7));
    client.batch_execute(&insert).await.unwrap();
    server.stop().await;
    assert_eq!(
        view_entries_since_base(dir.path()),
        0,
        "the restarted view did not count the changes stored before the restart"
    );

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(rows(&client, summary).await, expected(8));
    server.stop().await;
}

/// A view and a job reading the updating view `counts`.
const READERS_OF_COUNTS: &str =
    "CREATE MATERIALIZED VIEW spread AS SELECT n, count(*) AS keys FROM counts GROUP BY n;
     CREATE TABLE copied (k BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
     INSERT INTO copied SELECT k, n FROM counts";

/// Asserts that the readers of [`READERS_OF_COUNTS`] each read `n` rows since the server
/// started.
async fn assert_readers_read(client: &tokio_postgres::Client, n: i64) {
    let jobs = rows(client, "SHOW JOBS").await;
    for statement in ["AS SELECT n, count(*)", "INSERT INTO copied"] {
        let job = jobs
            .iter()
            .find(|j| j[1].contains(statement))
            .unwrap_or_else(|| panic!("no job runs {statement}: {jobs:?}"));
        assert_eq!(job[3].parse::<i64>().unwrap(), n, "{statement}");
    }
}

/// A view and a job reading an updating view go on after a kill -9 from where they were
/// in its changes: they read none of its rows again (before, they started over from
/// them), though the view folded its stored changes into its rows several times; the
/// changes after the restart reach them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_an_updating_view_resume_where_they_were_after_a_kill() {
    const KEYS: i64 = 40_000;
    let dir = tempfile::tempdir().unwrap();
    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    client.batch_execute(COUNTS_PER_KEY).await.unwrap();
    client.batch_execute(READERS_OF_COUNTS).await.unwrap();
    let values: Vec<String> = (0..KEYS).map(|k| format!("({k})")).collect();
    let all_keys = format!("INSERT INTO t VALUES {}; FLUSH", values.join(", "));
    // Every key changes every round: the view's stored changes fold every other round.
    for _ in 0..5 {
        client.batch_execute(&all_keys).await.unwrap();
    }
    let spread = "SELECT * FROM spread ORDER BY n";
    assert_eq!(rows(&client, spread).await, vec![vec!["5", "40000"]]);
    weir.kill_9();

    let weir = WeirProcess::start(dir.path());
    let client = common::connect(weir.port).await;
    client.batch_execute("FLUSH").await.unwrap();
    assert_eq!(rows(&client, spread).await, vec![vec!["5", "40000"]]);
    assert_readers_read(&client, 0).await;
    client
        .batch_execute("INSERT INTO t VALUES (1), (2), (3); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        rows(&client, spread).await,
        vec![vec!["5", "39997"], vec!["6", "3"]]
    );
    // Each changed key: -U and +U.
    assert_readers_read(&client, 6).await;
    weir.kill_9();
}

/// When the updating view itself cannot resume (its checkpoint is of another plan, so it
/// is rebuilt from its inputs and numbers its changes anew), a view over it is rebuilt
/// too and a job over it starts over from its rows: the rows stay right. A savepoint over
/// it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_rebuilt_updating_view_start_over_from_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client.batch_execute(COUNTS_PER_KEY).await.unwrap();
    client
        .batch_execute(&format!(
            "{READERS_OF_COUNTS}; INSERT INTO t VALUES (1), (2), (3), (3); FLUSH"
        ))
        .await
        .unwrap();
    const SAVED: &str = "CREATE MATERIALIZED VIEW saved AS SELECT count(*) AS keys FROM counts";
    client.batch_execute(SAVED).await.unwrap();
    let savepoint =
        rows(&client, "STOP MATERIALIZED VIEW saved WITH SAVEPOINT").await[0][0].clone();
    server.stop().await;
    {
        use weir_catalog::StateStore;
        let store = weir_catalog::SledStore::open(&dir.path().join("store")).unwrap();
        let metas = store.scan_prefix(b"ckpt/view/counts\0m").unwrap();
        assert!(!metas.is_empty());
        for (key, value) in metas {
            let mut meta: serde_json::Value = serde_json::from_slice(&value).unwrap();
            meta["fingerprint"] = "a plan of another version".into();
            store
                .put(&key, &serde_json::to_vec(&meta).unwrap())
                .unwrap();
        }
        store.flush().unwrap();
    }
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client.batch_execute("FLUSH").await.unwrap();
    let spread = "SELECT * FROM spread ORDER BY n";
    assert_eq!(
        rows(&client, spread).await,
        vec![vec!["1", "2"], vec!["2", "1"]]
    );
    // Both read the rebuilt view's three rows.
    assert_readers_read(&client, 3).await;
    client
        .batch_execute("INSERT INTO t VALUES (1); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        rows(&client, spread).await,
        vec![vec!["1", "1"], vec!["2", "2"]]
    );
    // A savepoint of a view over it cannot be started from: the place it kept is in
    // changes the rebuilt view no longer has.
    client
        .batch_execute(&format!("SET 'execution.savepoint.path' = '{savepoint}'"))
        .await
        .unwrap();
    let e = client.batch_execute(SAVED).await.unwrap_err();
    let e = e.as_db_error().unwrap();
    assert_eq!(e.code().code(), "55000", "{}", e.message());
    assert!(e.message().contains("rebuilt"), "{}", e.message());
    assert!(e.hint().unwrap_or_default().contains("RESET"), "{e:?}");
    server.stop().await;
}

/// The epochs of changes view `counts` has stored since its base, read from a stopped
/// server's store.
fn view_entries_since_base(data_dir: &std::path::Path) -> usize {
    let store = weir_catalog::SledStore::open(&data_dir.join("store")).unwrap();
    let view = weir::stream::checkpoint::store::Checkpoints::new(Arc::new(store), "view/counts");
    view.view_contents(u64::MAX).unwrap().entries
}

/// The server turns transparent huge pages off for its process (README, "Set-up").
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // SAFETY: PR_GET_THP_DISABLE takes no arguments and returns the process's flag.
    let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    assert_eq!(disabled, 1);
    server.stop().await;
}
