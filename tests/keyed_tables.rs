//! Tables with a primary key across restarts: the current rows (the changelog applied)
//! survive, writes after a restart upsert against them, and a materialized view over the
//! table replays the changelog to the same rows.

mod common;

use common::{rows, TestServer};

fn table(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| r.iter().map(|v| v.to_string()).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_rows_of_a_keyed_table_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE kv (k INT, v STRING, PRIMARY KEY (k) NOT ENFORCED);
             INSERT INTO kv VALUES (1, 'a'), (2, 'b'), (3, 'c');
             INSERT INTO kv VALUES (2, 'B');
             UPDATE kv SET v = v || '!' WHERE k >= 2;
             DELETE FROM kv WHERE k = 1;
             UPDATE kv SET k = 30 WHERE k = 3;
             CREATE MATERIALIZED VIEW marked AS SELECT k, v FROM kv WHERE v LIKE '%!';
             FLUSH;",
        )
        .await
        .unwrap();
    let expected = table(&[&["2", "B!"], &["30", "c!"]]);
    assert_eq!(rows(&client, "SELECT * FROM kv ORDER BY k").await, expected);
    assert_eq!(
        rows(&client, "SELECT * FROM marked ORDER BY k").await,
        expected
    );
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(rows(&client, "SELECT * FROM kv ORDER BY k").await, expected);
    // The view's job replays the changelog from the start.
    client.batch_execute("FLUSH").await.unwrap();
    assert_eq!(
        rows(&client, "SELECT * FROM marked ORDER BY k").await,
        expected
    );
    // Writes after the restart see the rows as they were: an existing key is replaced.
    client
        .batch_execute(
            "INSERT INTO kv VALUES (30, 'C'), (4, 'd!');
             DELETE FROM kv WHERE k = 2;
             FLUSH;",
        )
        .await
        .unwrap();
    let expected = table(&[&["4", "d!"], &["30", "C"]]);
    assert_eq!(rows(&client, "SELECT * FROM kv ORDER BY k").await, expected);
    assert_eq!(
        rows(&client, "SELECT * FROM marked ORDER BY k").await,
        table(&[&["4", "d!"]])
    );
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert_eq!(rows(&client, "SELECT * FROM kv ORDER BY k").await, expected);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_delete_take_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE kv (k INT, v STRING, PRIMARY KEY (k) NOT ENFORCED);
             INSERT INTO kv VALUES (1, 'a'), (2, 'b'), (3, 'c');",
        )
        .await
        .unwrap();
    let updated = client
        .execute("UPDATE kv SET v = $1 WHERE k >= $2", &[&"z", &2i32])
        .await
        .unwrap();
    assert_eq!(updated, 2);
    let deleted = client
        .execute("DELETE FROM kv WHERE k = $1", &[&3i32])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        rows(&client, "SELECT * FROM kv ORDER BY k").await,
        table(&[&["1", "a"], &["2", "z"]])
    );
    server.stop().await;
}
