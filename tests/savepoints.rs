//! Savepoints: a view or job stopped with a savepoint and started again from it, at the
//! same or another parallelism, counts every row once, across a restart too; a changed
//! query is refused. ALTER ... SET PARALLELISM rescales a running view or job in place.

mod common;

use common::{rows, TestServer};
use tokio_postgres::Client;

async fn run(client: &Client, sql: &str) {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn error_code(client: &Client, sql: &str) -> (String, String) {
    let e = client.simple_query(sql).await.expect_err(sql);
    let db = e.as_db_error().expect("a database error");
    (db.code().code().to_string(), db.message().to_string())
}

async fn insert_clicks(client: &Client, from: i64, to: i64) {
    let values: Vec<String> = (from..to)
        .map(|i| {
            format!(
                "({}, {i}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{}' SECOND)",
                i % 3,
                i * 2
            )
        })
        .collect();
    run(
        client,
        &format!("INSERT INTO clicks VALUES {}", values.join(", ")),
    )
    .await;
}

/// A server with an empty `clicks` table, planning at `parallelism`.
async fn with_clicks(parallelism: usize) -> (tempfile::TempDir, TestServer, Client) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    run(
        &client,
        &format!("SET 'parallelism.default' = '{parallelism}'"),
    )
    .await;
    run(
        &client,
        "CREATE TABLE clicks (k BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)",
    )
    .await;
    (dir, server, client)
}

/// The rows of `per_key` once the clicks `0..upto` are counted.
fn expected(upto: i64) -> Vec<Vec<String>> {
    (0..3)
        .map(|k| {
            let vs: Vec<i64> = (0..upto).filter(|i| i % 3 == k).collect();
            vec![
                k.to_string(),
                vs.len().to_string(),
                vs.iter().sum::<i64>().to_string(),
            ]
        })
        .collect()
}

const VIEW: &str = "CREATE MATERIALIZED VIEW per_key AS \
    SELECT k, count(*) AS n, sum(v) AS total FROM clicks GROUP BY k";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_resumes_from_its_savepoint_and_counts_every_row_once() {
    let (dir, server, client) = with_clicks(2).await;
    run(&client, VIEW).await;
    insert_clicks(&client, 0, 30).await;
    run(&client, "FLUSH").await;
    let saved = rows(&client, "STOP MATERIALIZED VIEW per_key WITH SAVEPOINT").await;
    let name = saved[0][0].clone();
    assert!(name.starts_with("sp-"), "{name}");
    assert_eq!(
        error_code(&client, "SELECT * FROM per_key").await.0,
        "42P01"
    );
    let listed = rows(&client, "SHOW SAVEPOINTS").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0][0], name);
    assert!(listed[0][4].contains("GROUP BY k"), "{listed:?}");
    assert_eq!(listed[0][5], "", "it read no updating view");

    // Rows that arrive while the view is stopped are read when it starts again.
    insert_clicks(&client, 30, 45).await;

    // Another query cannot start from it.
    run(
        &client,
        &format!("SET 'execution.savepoint.path' = '{name}'"),
    )
    .await;
    let (code, message) = error_code(
        &client,
        "CREATE MATERIALIZED VIEW per_key AS SELECT k, max(v) AS top FROM clicks GROUP BY k",
    )
    .await;
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains(&name), "{message}");
    // The same query at another parallelism can: the groups move between subtasks.
    run(&client, "SET 'parallelism.default' = '3'").await;
    run(&client, VIEW).await;
    run(&client, "RESET 'execution.savepoint.path'").await;
    insert_clicks(&client, 45, 60).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        expected(60)
    );
    // It read only the rows after the savepoint's position: a view that replayed its
    // input from the start would have read all 60.
    let jobs = rows(&client, "SHOW JOBS").await;
    let rows_in: Vec<&str> = jobs
        .iter()
        .filter(|j| j[1].contains("per_key"))
        .map(|j| j[3].as_str())
        .collect();
    assert_eq!(rows_in, vec!["30"], "{jobs:?}");

    // The savepoint outlives a restart, and so does the restored view.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(rows(&client, "SHOW SAVEPOINTS").await[0][0], name);
    insert_clicks(&client, 60, 66).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        expected(66)
    );
    server.stop().await;
}

/// A view over an updating view (`per_key`'s rows change with every click) starts from
/// its savepoint where it was in that view's changes, at another parallelism, also after
/// the view folded its changes many times (it keeps those after a savepoint until DROP
/// SAVEPOINT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_over_an_updating_view_resumes_from_its_savepoint() {
    let (dir, server, client) = with_clicks(2).await;
    run(&client, VIEW).await;
    const TOTALS: &str = "CREATE MATERIALIZED VIEW totals AS \
        SELECT count(*) AS keys, sum(n) AS n, sum(total) AS total FROM per_key";
    run(&client, TOTALS).await;
    let totals = |upto: i64| {
        vec![vec![
            "3".to_string(),
            upto.to_string(),
            (0..upto).sum::<i64>().to_string(),
        ]]
    };
    insert_clicks(&client, 0, 30).await;
    run(&client, "FLUSH").await;
    assert_eq!(rows(&client, "SELECT * FROM totals").await, totals(30));
    let name = rows(&client, "STOP MATERIALIZED VIEW totals WITH SAVEPOINT").await[0][0].clone();
    // per_key changes while totals is stopped: totals reads those changes when it starts.
    insert_clicks(&client, 30, 45).await;
    run(&client, "FLUSH").await;
    run(
        &client,
        &format!("SET 'execution.savepoint.path' = '{name}'"),
    )
    .await;
    run(&client, "SET 'parallelism.default' = '3'").await;
    run(&client, TOTALS).await;
    run(&client, "RESET 'execution.savepoint.path'").await;
    insert_clicks(&client, 45, 60).await;
    run(&client, "FLUSH").await;
    assert_eq!(rows(&client, "SELECT * FROM totals").await, totals(60));

    // Stopped again: per_key keeps its changes after the savepoint through the folds
    // of 70 epochs of changes.
    let (watcher, mut notices) = common::connect_with_notices(server.port).await;
    let name2 = rows(&watcher, "STOP MATERIALIZED VIEW totals WITH SAVEPOINT").await[0][0].clone();
    let (code, notice) = notices.recv().await.expect("a notice");
    assert_eq!(code, "01000");
    assert!(
        notice.starts_with("materialized view per_key keeps its changes after its epoch ")
            && notice.ends_with(&format!("until DROP SAVEPOINT '{name2}'")),
        "{notice}"
    );
    for i in 60..130 {
        insert_clicks(&client, i, i + 1).await;
        run(&client, "FLUSH").await;
    }
    run(
        &client,
        &format!("SET 'execution.savepoint.path' = '{name2}'"),
    )
    .await;
    run(&client, TOTALS).await;
    run(&client, "RESET 'execution.savepoint.path'").await;
    run(&client, "FLUSH").await;
    assert_eq!(rows(&client, "SELECT * FROM totals").await, totals(130));

    // SHOW SAVEPOINTS tells what each keeps.
    let listed = rows(&client, "SHOW SAVEPOINTS").await;
    assert_eq!(listed.len(), 2);
    for row in &listed {
        assert!(row[5].starts_with("per_key after epoch "), "{listed:?}");
    }
    // Dropping the savepoints and the view leaves per_key keeping nothing for them.
    for n in [&name, &name2] {
        run(&client, &format!("DROP SAVEPOINT '{n}'")).await;
    }
    let (code, _) = error_code(&client, &format!("DROP SAVEPOINT '{name}'")).await;
    assert_eq!(code, "42704");
    assert!(rows(&client, "SHOW SAVEPOINTS").await.is_empty());
    run(&client, "DROP MATERIALIZED VIEW totals").await;
    server.stop().await;
    let store = weir_catalog::SledStore::open(&dir.path().join("store")).unwrap();
    let per_key = weir::stream::checkpoint::store::Checkpoints::new(
        std::sync::Arc::new(store),
        "view/per_key",
    );
    assert!(per_key.readers().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stopped_with_a_savepoint_writes_each_window_once() {
    let (_dir, server, client) = with_clicks(1).await;
    run(
        &client,
        "CREATE TABLE windows (window_start TIMESTAMP(3), n BIGINT, total BIGINT)",
    )
    .await;
    let insert = "INSERT INTO windows SELECT window_start, count(*), sum(v) FROM \
        TABLE(TUMBLE(TABLE clicks, DESCRIPTOR(ts), INTERVAL '10' SECOND)) \
        GROUP BY window_start, window_end";
    let id = rows(&client, insert).await[0][0].clone();
    insert_clicks(&client, 0, 20).await;
    run(&client, "FLUSH").await;
    let saved = rows(&client, &format!("STOP JOB '{id}' WITH SAVEPOINT")).await;
    let name = saved[0][0].clone();
    assert!(rows(&client, "SHOW JOBS").await.is_empty());
    insert_clicks(&client, 20, 40).await;
    run(
        &client,
        &format!("SET 'execution.savepoint.path' = '{name}'"),
    )
    .await;
    rows(&client, insert).await;
    run(&client, "FLUSH").await;
    // Windows of 5 rows (2 s apart); 40 rows close windows 0..7 (the watermark is 78 s).
    let written = rows(
        &client,
        "SELECT window_start, n, total FROM windows ORDER BY window_start",
    )
    .await;
    let expected: Vec<Vec<String>> = (0..7)
        .map(|w| {
            let vs: Vec<i64> = (w * 5..w * 5 + 5).collect();
            vec![
                format!("2024-01-01 00:{:02}:{:02}.000000", w * 10 / 60, w * 10 % 60),
                "5".to_string(),
                vs.iter().sum::<i64>().to_string(),
            ]
        })
        .collect();
    assert_eq!(written, expected);
    assert_eq!(
        error_code(&client, "STOP JOB 'nope' WITH SAVEPOINT")
            .await
            .0,
        "42704"
    );
    run(&client, "SET 'execution.savepoint.path' = 'nope'").await;
    assert_eq!(error_code(&client, insert).await.0, "42704");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_rescaled_in_place_counts_every_row_once_across_a_restart() {
    let (dir, server, client) = with_clicks(2).await;
    run(&client, VIEW).await;
    insert_clicks(&client, 0, 30).await;
    run(&client, "FLUSH").await;
    run(
        &client,
        "ALTER MATERIALIZED VIEW per_key SET PARALLELISM = 3",
    )
    .await;
    insert_clicks(&client, 30, 45).await;
    run(&client, "FLUSH").await;
    // The rescaled job read only what came after its checkpoint.
    let jobs = rows(&client, "SHOW JOBS").await;
    let rows_in: Vec<&str> = jobs.iter().map(|j| j[3].as_str()).collect();
    assert_eq!(rows_in, vec!["15"], "{jobs:?}");
    run(
        &client,
        "ALTER MATERIALIZED VIEW per_key SET PARALLELISM = 1",
    )
    .await;
    insert_clicks(&client, 45, 50).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        expected(50)
    );
    // The new parallelism is kept with the view: a restart resumes at it.
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    insert_clicks(&client, 50, 56).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        expected(56)
    );
    run(
        &client,
        "ALTER MATERIALIZED VIEW per_key SET PARALLELISM = 2",
    )
    .await;
    insert_clicks(&client, 56, 60).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        expected(60)
    );
    server.stop().await;
}

/// Polls `sql` (one number) until it reaches `want`, FLUSHing in between.
async fn wait_for_count(client: &Client, sql: &str, want: i64) {
    let start = std::time::Instant::now();
    loop {
        run(client, "FLUSH").await;
        let got: i64 = rows(client, sql).await[0][0].parse().unwrap_or(0);
        if got >= want {
            return;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{sql}: {got} of {want} after a minute"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_sources_rescaled_while_reading_produce_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    run(&client, "SET 'parallelism.default' = '2'").await;
    run(
        &client,
        "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', \
         'rows-per-second' = '4000', 'fields.id.kind' = 'sequence', \
         'fields.id.start' = '1', 'fields.id.end' = '8000')",
    )
    .await;
    let bids = |name: &str, pace: &str| {
        format!(
            "CREATE TABLE {name} (auction BIGINT, price BIGINT) WITH ('connector' = 'nexmark', \
             'nexmark.table' = 'bid', 'nexmark.event.num' = '12000'{pace})"
        )
    };
    run(
        &client,
        &bids("bids", ", 'nexmark.events-per-second' = '6000'"),
    )
    .await;
    run(&client, &bids("all_bids", "")).await;
    run(
        &client,
        "CREATE MATERIALIZED VIEW gen_counts AS SELECT id % 4 AS k, count(*) AS n, \
         count(DISTINCT id) AS d, sum(id) AS s FROM gen GROUP BY id % 4",
    )
    .await;
    let per_auction = "SELECT auction % 4 AS k, count(*) AS n, sum(price) AS s FROM";
    run(
        &client,
        &format!("CREATE MATERIALIZED VIEW bid_counts AS {per_auction} bids GROUP BY auction % 4"),
    )
    .await;
    // A job copying the rows straight into files: source and sink move together.
    let out = dir.path().join("out");
    run(
        &client,
        &format!(
            "CREATE TABLE out (id BIGINT) WITH ('connector' = 'filesystem',              'path' = '{}', 'format' = 'csv')",
            out.display()
        ),
    )
    .await;
    run(&client, "INSERT INTO out SELECT id FROM gen").await;
    let job = rows(&client, "SHOW JOBS")
        .await
        .into_iter()
        .find(|j| j[1].contains("INSERT INTO out"))
        .expect("the copying job")[0]
        .clone();
    // The sources move while they read (their splits' progress uneven): 2 → 3 → 1 → 4.
    for (to, pause) in [(3, 500), (1, 400), (4, 300)] {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        for view in ["gen_counts", "bid_counts"] {
            run(
                &client,
                &format!("ALTER MATERIALIZED VIEW {view} SET PARALLELISM = {to}"),
            )
            .await;
        }
        run(
            &client,
            &format!("ALTER JOB '{job}' SET PARALLELISM = {to}"),
        )
        .await;
    }
    let all_bids: i64 = rows(&client, "SELECT count(*) FROM all_bids").await[0][0]
        .parse()
        .unwrap();
    wait_for_count(&client, "SELECT sum(n) FROM gen_counts", 8000).await;
    wait_for_count(&client, "SELECT sum(n) FROM bid_counts", all_bids).await;
    // Both sources ended: nothing more comes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    run(&client, "FLUSH").await;
    let expected: Vec<Vec<String>> = (0..4)
        .map(|k| {
            let ids: Vec<i64> = (1..=8000).filter(|i| i % 4 == k).collect();
            let n = ids.len().to_string();
            vec![
                k.to_string(),
                n.clone(),
                n,
                ids.iter().sum::<i64>().to_string(),
            ]
        })
        .collect();
    assert_eq!(
        rows(&client, "SELECT * FROM gen_counts ORDER BY k").await,
        expected
    );
    // Every row copied once, by files of subtasks of every parallelism it had.
    let copied = || {
        let mut copied: Vec<i64> = Vec::new();
        let mut writers = std::collections::BTreeSet::new();
        for file in std::fs::read_dir(&out).unwrap() {
            let file = file.unwrap();
            let name = file.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // part-<job>-<subtask>-<n>.csv
            writers.insert(name.rsplit('-').nth(1).unwrap().to_string());
            let text = std::fs::read_to_string(file.path()).unwrap();
            copied.extend(text.lines().map(|l| l.parse::<i64>().unwrap()));
        }
        copied.sort();
        (copied, writers)
    };
    let start = std::time::Instant::now();
    while copied().0.len() < 8000 && start.elapsed() < std::time::Duration::from_secs(60) {
        run(&client, "FLUSH").await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (copied, writers) = copied();
    assert_eq!(copied, (1..=8000).collect::<Vec<_>>());
    assert!(
        writers.contains("2"),
        "subtask 2 of 3 or 4 wrote: {writers:?}"
    );
    assert_eq!(
        rows(&client, "SELECT * FROM bid_counts ORDER BY k").await,
        rows(
            &client,
            &format!("{per_auction} all_bids GROUP BY auction % 4 ORDER BY k")
        )
        .await
    );
    server.stop().await;
}
