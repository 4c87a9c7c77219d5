//! Updating queries as a client sees them beyond what sqllogictest can check: NOTICEs
//! about unbounded state at CREATE time, state kept bounded by 'table.exec.state.ttl', and
//! the scratch directories of 'state.backend' = 'sled'.

mod common;

use std::time::Duration;

use common::{rows, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_state_gets_a_notice_at_create_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (client, mut notices) = common::connect_with_notices(server.port).await;
    client
        .batch_execute(
            "CREATE TABLE clicks (user_id INT, page STRING);
             CREATE MATERIALIZED VIEW per_user AS SELECT user_id, count(*) AS n FROM clicks GROUP BY user_id",
        )
        .await
        .unwrap();
    let (code, message) = notices.recv().await.expect("a notice");
    assert_eq!(code, "01000");
    assert!(
        message.starts_with(
            "GroupAggregate (group by clicks.user_id; count(Int64(1))) keeps state for every key"
        ),
        "{message}"
    );
    assert!(message.contains("SET 'table.exec.state.ttl'"), "{message}");

    // A TTL bounds the state: no notice. A global aggregate has one key: no notice.
    client
        .batch_execute(
            "SET 'table.exec.state.ttl' = '1 h';
             CREATE MATERIALIZED VIEW per_page AS SELECT page, count(*) AS n FROM clicks GROUP BY page;
             RESET 'table.exec.state.ttl';
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM clicks",
        )
        .await
        .unwrap();
    assert!(notices.try_recv().is_err());
    server.stop().await;
}

/// The state of the job whose statement starts with `prefix`, from SHOW JOBS.
async fn state_bytes(client: &tokio_postgres::Client, prefix: &str) -> i64 {
    let jobs = rows(client, "SHOW JOBS").await;
    let job = jobs
        .iter()
        .find(|j| j[1].starts_with(prefix))
        .unwrap_or_else(|| panic!("no job {prefix}: {jobs:?}"));
    job[7].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_ttl_bounds_state_while_new_keys_keep_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "SET 'parallelism.default' = '1';
             CREATE TABLE events (k BIGINT, v BIGINT);
             CREATE TABLE counts_forever (k BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
             CREATE TABLE counts_expiring (k BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
             CREATE TABLE latest_expiring (k BIGINT, v BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO counts_forever SELECT k, count(*) FROM events GROUP BY k;
             SET 'table.exec.state.ttl' = '300 ms';
             INSERT INTO counts_expiring SELECT k, count(*) FROM events GROUP BY k;
             INSERT INTO latest_expiring SELECT k, v FROM (
               SELECT k, v, ROW_NUMBER() OVER (PARTITION BY k ORDER BY v DESC) AS rn FROM events)
             WHERE rn = 1;
             CREATE MATERIALIZED VIEW expiring AS SELECT k, count(*) AS n FROM events GROUP BY k",
        )
        .await
        .unwrap();
    let per_round = 500;
    let rounds = 8;
    let mut expiring_sizes = Vec::new();
    for round in 0..rounds {
        let values: Vec<String> = (0..per_round)
            .map(|i| format!("({}, {i})", round * per_round + i))
            .collect();
        client
            .batch_execute(&format!(
                "INSERT INTO events VALUES {}; FLUSH",
                values.join(", ")
            ))
            .await
            .unwrap();
        // Older keys pass their TTL; the next epoch forgets them.
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.batch_execute("FLUSH").await.unwrap();
        expiring_sizes.push(state_bytes(&client, "INSERT INTO counts_expiring").await);
    }
    let forever = state_bytes(&client, "INSERT INTO counts_forever").await;
    let expiring = *expiring_sizes.last().unwrap();
    let latest = state_bytes(&client, "INSERT INTO latest_expiring").await;
    // Without a TTL every key stays; with one, only the keys of the last round or two.
    assert!(
        expiring * 4 < forever,
        "with TTL {expiring_sizes:?}, without {forever}"
    );
    assert!(
        latest * 4 < forever,
        "TopN with TTL {latest}, without {forever}"
    );
    assert!(
        expiring_sizes.iter().all(|&s| s * 4 < forever),
        "state grows under TTL: {expiring_sizes:?}, without TTL {forever}"
    );
    // The views keep what was emitted: expiring state is forgotten silently (Flink's TTL).
    assert_eq!(
        rows(&client, "SELECT count(*) FROM expiring").await,
        vec![vec![(per_round * rounds).to_string()]]
    );
    // A key seen again after its state expired starts over.
    client
        .batch_execute("INSERT INTO events VALUES (0, 99); FLUSH")
        .await
        .unwrap();
    let expiring_rows = rows(&client, "SELECT n FROM expiring WHERE k = 0 ORDER BY n").await;
    assert_eq!(
        expiring_rows,
        vec![vec!["1".to_string()], vec!["1".to_string()]]
    );
    server.stop().await;
}

/// Under 'state.backend' = 'sled' each join subtask has a scratch directory in the data
/// directory while its view runs, with its rows in files there, gone with the view; the rows are those of memory, also
/// after a restart restored the join from the chunks its checkpoints stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_backend_keeps_join_rows_in_scratch_directories_of_the_view() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    let values = |f: &dyn Fn(i64) -> String| (0..2000).map(f).collect::<Vec<_>>().join(", ");
    client
        .batch_execute(&format!(
            "SET 'parallelism.default' = '2';
             SET 'state.backend' = 'sled';
             SET 'state.backend.sled.memory' = '0';
             CREATE TABLE orders (id BIGINT, customer BIGINT);
             CREATE TABLE customers (id BIGINT, name STRING);
             CREATE MATERIALIZED VIEW named AS
               SELECT o.id, c.name FROM orders o JOIN customers c ON o.customer = c.id;
             INSERT INTO orders VALUES {};
             INSERT INTO customers VALUES {};
             FLUSH",
            values(&|i| format!("({i}, {})", i % 100)),
            values(&|i| format!("({i}, 'c{i}')")),
        ))
        .await
        .unwrap();
    assert_eq!(
        rows(&client, "SELECT count(*), count(DISTINCT name) FROM named").await,
        vec![vec!["2000".to_string(), "100".to_string()]]
    );
    let scratch = || common::scratch_dirs(dir.path()).0;
    assert_eq!(scratch(), 2, "one scratch directory per join subtask");
    assert!(
        common::scratch_dirs(dir.path()).1 > 0,
        "rows in files on disk"
    );
    // Its checkpoints hold the rows in sled as chunks the subtasks wrote while they took
    // their snapshots, and a restart restores the join from them.
    server.stop().await;
    {
        let store = weir_catalog::SledStore::open(&dir.path().join("store")).unwrap();
        let chunks = weir_catalog::StateStore::scan_keys(&store, b"ckpt/view/named\0c").unwrap();
        assert!(!chunks.is_empty(), "no state stored as chunks");
    }
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute("INSERT INTO orders VALUES (5000, 7), (5001, 7); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        rows(&client, "SELECT count(*), count(DISTINCT name) FROM named").await,
        vec![vec!["2002".to_string(), "100".to_string()]]
    );
    assert_eq!(
        rows(&client, "SELECT name FROM named WHERE id >= 5000").await,
        vec![vec!["c7".to_string()], vec!["c7".to_string()]]
    );
    client
        .batch_execute("DROP MATERIALIZED VIEW named")
        .await
        .unwrap();
    // The job stops a little after the statement returns.
    let mut waited = 0;
    while scratch() > 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += 1;
    }
    assert_eq!(scratch(), 0, "the scratch directories go with the view");
    server.stop().await;
}
