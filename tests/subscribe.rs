//! Changefeeds over pgwire: SUBSCRIBE streamed through the simple and extended
//! protocols, COPY (SUBSCRIBE ...) TO STDOUT, cursors with FETCH and timeouts (also the
//! exact messages psycopg 3 sends for a server-side cursor), cancel, disconnect, and a
//! subscriber that falls behind.

mod common;

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use common::{rows, try_rows, TestServer};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// A table and a view over it, with two rows published.
async fn setup(client: &Client) {
    client
        .batch_execute(
            "CREATE TABLE t (k INT, v INT);
             INSERT INTO t VALUES (1, 1), (2, 2);
             CREATE MATERIALIZED VIEW tens AS SELECT k, v * 10 AS v10 FROM t WHERE v > 0;
             FLUSH",
        )
        .await
        .unwrap();
}

fn row(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

const WAIT: Duration = Duration::from_secs(20);

/// The next `n` rows of a simple-protocol stream, sorted (rows of one publish come in
/// any order).
async fn next_rows<S>(stream: &mut Pin<Box<S>>, n: usize) -> Vec<Vec<String>>
where
    S: Stream<Item = Result<SimpleQueryMessage, tokio_postgres::Error>> + ?Sized,
{
    let mut out = vec![];
    while out.len() < n {
        let message = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("rows arrive in time")
            .expect("the stream goes on")
            .unwrap_or_else(|e| panic!("subscription failed: {e}"));
        if let SimpleQueryMessage::Row(r) = message {
            out.push(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            );
        }
    }
    out.sort();
    out
}

/// The error a stream ends with.
async fn stream_error<S, T>(stream: &mut Pin<Box<S>>) -> tokio_postgres::Error
where
    S: Stream<Item = Result<T, tokio_postgres::Error>> + ?Sized,
{
    loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("the stream ends in time")
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return e,
            None => panic!("the stream ended without an error"),
        }
    }
}

fn code(e: &tokio_postgres::Error) -> &str {
    e.code().map(|c| c.code()).unwrap_or("none")
}

async fn cancel(client: &Client) {
    client.cancel_token().cancel_query(NoTls).await.unwrap();
}

/// Waits until no running job is a subscription's.
async fn subscription_jobs_gone(client: &Client) {
    let deadline = Instant::now() + WAIT;
    loop {
        let jobs = show_jobs(client).await;
        if !jobs.iter().any(|s| s.starts_with("SUBSCRIBE")) {
            return;
        }
        assert!(Instant::now() < deadline, "still running: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn show_jobs(client: &Client) -> Vec<String> {
    client
        .simple_query("SHOW JOBS")
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(1).unwrap_or_default().to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_sends_the_snapshot_then_each_change_until_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let mut stream = Box::pin(
        subscriber
            .simple_query_raw("SUBSCRIBE TO tens")
            .await
            .unwrap(),
    );
    assert_eq!(
        next_rows(&mut stream, 2).await,
        [row(&["+I", "1", "10"]), row(&["+I", "2", "20"])]
    );
    client
        .batch_execute("INSERT INTO t VALUES (3, 3), (4, -1); FLUSH")
        .await
        .unwrap();
    assert_eq!(next_rows(&mut stream, 1).await, [row(&["+I", "3", "30"])]);
    client
        .batch_execute("INSERT INTO t VALUES (5, 5); FLUSH")
        .await
        .unwrap();
    assert_eq!(next_rows(&mut stream, 1).await, [row(&["+I", "5", "50"])]);
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    drop(stream);
    // The connection goes on.
    assert_eq!(rows(&subscriber, "SELECT 1").await, [row(&["1"])]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_false_sends_only_later_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let mut stream = Box::pin(
        subscriber
            .simple_query_raw("SUBSCRIBE tens WITH (snapshot = false)")
            .await
            .unwrap(),
    );
    // Nothing comes until a change is published.
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), next_rows(&mut stream, 1))
            .await
            .is_err()
    );
    client
        .batch_execute("INSERT INTO t VALUES (6, 6); FLUSH")
        .await
        .unwrap();
    assert_eq!(next_rows(&mut stream, 1).await, [row(&["+I", "6", "60"])]);
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_a_query_runs_a_job_that_ends_with_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let mut stream = Box::pin(
        subscriber
            .simple_query_raw("SUBSCRIBE TO (SELECT k, v + 100 AS w FROM t WHERE k > 1)")
            .await
            .unwrap(),
    );
    assert_eq!(next_rows(&mut stream, 1).await, [row(&["+I", "2", "102"])]);
    let jobs = show_jobs(&client).await;
    assert!(
        jobs.iter()
            .any(|s| s == "SUBSCRIBE TO (SELECT k, v + 100 AS w FROM t WHERE k > 1)"),
        "{jobs:?}"
    );
    client
        .batch_execute("INSERT INTO t VALUES (7, 7), (0, 0); FLUSH")
        .await
        .unwrap();
    assert_eq!(next_rows(&mut stream, 1).await, [row(&["+I", "7", "107"])]);
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    subscription_jobs_gone(&client).await;
    // The view's job is untouched.
    assert_eq!(show_jobs(&client).await.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_an_updating_query_streams_its_corrections() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let mut stream = Box::pin(
        subscriber
            .simple_query_raw(
                "SUBSCRIBE TO (SELECT v > 1 AS big, count(*) AS n FROM t GROUP BY v > 1)",
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        next_rows(&mut stream, 2).await,
        [row(&["+I", "f", "1"]), row(&["+I", "t", "1"])]
    );
    client
        .batch_execute("INSERT INTO t VALUES (20, 20); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        next_rows(&mut stream, 2).await,
        [row(&["+U", "t", "2"]), row(&["-U", "t", "1"])]
    );
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    subscription_jobs_gone(&client).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_its_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    // A connection whose socket this test can close, as a client process that exits does.
    let (subscriber, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=weir dbname=weir", server.port),
        NoTls,
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let mut stream = Box::pin(
        subscriber
            .simple_query_raw("SUBSCRIBE TO (SELECT k FROM t)")
            .await
            .unwrap(),
    );
    assert_eq!(next_rows(&mut stream, 2).await.len(), 2);
    assert!(show_jobs(&client)
        .await
        .iter()
        .any(|s| s.starts_with("SUBSCRIBE")));
    connection.abort();
    let _ = connection.await;
    subscription_jobs_gone(&client).await;
    server.stop().await;
}

/// The next `n` rows of an extended-protocol stream of the view, sorted.
async fn typed_rows(
    stream: &mut Pin<Box<tokio_postgres::RowStream>>,
    n: usize,
) -> Vec<(String, i32, i64)> {
    let mut out = vec![];
    for _ in 0..n {
        let r = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        out.push((r.get(0), r.get(1), r.get(2)));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_over_the_extended_protocol_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let statement = subscriber.prepare("SUBSCRIBE TO tens").await.unwrap();
    let names: Vec<&str> = statement.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["op", "k", "v10"]);
    let rows_stream = subscriber
        .query_raw(&statement, std::iter::empty::<i32>())
        .await
        .unwrap();
    let mut stream = Box::pin(rows_stream);
    assert_eq!(
        typed_rows(&mut stream, 2).await,
        [("+I".to_string(), 1, 10), ("+I".to_string(), 2, 20)]
    );
    client
        .batch_execute("INSERT INTO t VALUES (8, 8); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        typed_rows(&mut stream, 1).await,
        [("+I".to_string(), 8, 80)]
    );
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    assert_eq!(rows(&subscriber, "SELECT 2").await, [row(&["2"])]);
    server.stop().await;
}

/// The next `n` lines of a COPY stream, sorted. Each row is one CopyData message.
async fn copy_lines(stream: &mut Pin<Box<tokio_postgres::CopyOutStream>>, n: usize) -> Vec<String> {
    let mut lines = vec![];
    while lines.len() < n {
        let chunk = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        lines.extend(
            std::str::from_utf8(&chunk)
                .unwrap()
                .lines()
                .map(str::to_string),
        );
    }
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_streams_the_changelog_as_text_rows() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let subscriber = server.connect().await;
    let mut stream = Box::pin(
        subscriber
            .copy_out("COPY (SUBSCRIBE TO tens) TO STDOUT")
            .await
            .unwrap(),
    );
    assert_eq!(copy_lines(&mut stream, 2).await, ["+I\t1\t10", "+I\t2\t20"]);
    client
        .batch_execute("INSERT INTO t VALUES (9, 9); FLUSH")
        .await
        .unwrap();
    assert_eq!(copy_lines(&mut stream, 1).await, ["+I\t9\t90"]);
    cancel(&subscriber).await;
    assert_eq!(code(&stream_error(&mut stream).await), "57014");
    assert_eq!(rows(&subscriber, "SELECT 3").await, [row(&["3"])]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_fetch_what_is_there_wait_for_changes_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let reader = server.connect().await;
    reader
        .batch_execute("BEGIN; DECLARE c CURSOR FOR SUBSCRIBE TO tens")
        .await
        .unwrap();
    // FETCH n returns at most n rows.
    assert_eq!(rows(&reader, "FETCH 1 FROM c").await.len(), 1);
    assert_eq!(rows(&reader, "FETCH ALL c").await.len(), 1);
    // Nothing there: the timeout passes and no rows come.
    let started = Instant::now();
    assert!(rows(&reader, "FETCH 10 FROM c WITH (timeout = '300ms')")
        .await
        .is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Without a timeout FETCH waits for the next change.
    let writer = tokio::spawn({
        let port = server.port;
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            common::connect(port)
                .await
                .batch_execute("INSERT INTO t VALUES (10, 10), (11, 11); FLUSH")
                .await
                .unwrap();
        }
    });
    let mut fetched = rows(&reader, "FETCH FORWARD 5 FROM c").await;
    writer.await.unwrap();
    fetched.extend(rows(&reader, "FETCH ALL FROM c WITH (timeout = '1s')").await);
    fetched.sort();
    assert_eq!(
        fetched,
        [row(&["+I", "10", "100"]), row(&["+I", "11", "110"])]
    );
    // A cursor of the transaction closes with it.
    reader.batch_execute("COMMIT").await.unwrap();
    let e = try_rows(&reader, "FETCH 1 FROM c").await.unwrap_err();
    assert_eq!(code(&e), "34000");

    // Outside a transaction a cursor lives until CLOSE; one over a query stops its job.
    reader
        .batch_execute("DECLARE d CURSOR FOR SUBSCRIBE TO (SELECT k FROM t WHERE k = 10)")
        .await
        .unwrap();
    assert_eq!(
        rows(&reader, "FETCH 1 FROM d WITH (timeout = '10s')").await,
        [row(&["+I", "10"])]
    );
    assert!(show_jobs(&client)
        .await
        .iter()
        .any(|s| s.starts_with("SUBSCRIBE")));
    let e = reader
        .batch_execute("DECLARE d CURSOR FOR SUBSCRIBE TO tens")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "42P03");
    reader.batch_execute("CLOSE d").await.unwrap();
    subscription_jobs_gone(&client).await;
    let e = reader.batch_execute("CLOSE d").await.unwrap_err();
    assert_eq!(code(&e), "34000");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_waiting_fetch_and_keeps_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let reader = server.connect().await;
    reader
        .batch_execute("DECLARE c CURSOR FOR SUBSCRIBE TO tens WITH (snapshot = false)")
        .await
        .unwrap();
    let canceller = tokio::spawn({
        let token = reader.cancel_token();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await.unwrap();
        }
    });
    let e = try_rows(&reader, "FETCH 1 FROM c").await.unwrap_err();
    canceller.await.unwrap();
    assert_eq!(code(&e), "57014");
    client
        .batch_execute("INSERT INTO t VALUES (12, 12); FLUSH")
        .await
        .unwrap();
    assert_eq!(
        rows(&reader, "FETCH 1 FROM c WITH (timeout = '10s')").await,
        [row(&["+I", "12", "120"])]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_work_over_the_extended_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let mut reader = server.connect().await;
    let tx = reader.transaction().await.unwrap();
    tx.execute("DECLARE c CURSOR FOR SUBSCRIBE TO tens", &[])
        .await
        .unwrap();
    let fetched = tx
        .query("FETCH 5 FROM c WITH (timeout = '1s')", &[])
        .await
        .unwrap();
    let mut got: Vec<(String, i32, i64)> = fetched
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    got.sort();
    assert_eq!(got, [("+I".into(), 1, 10), ("+I".into(), 2, 20)]);
    tx.commit().await.unwrap();
    let e = reader.query("FETCH 1 FROM c", &[]).await.unwrap_err();
    assert_eq!(code(&e), "34000");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_view_ends_its_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let reader = server.connect().await;
    reader
        .batch_execute("DECLARE c CURSOR FOR SUBSCRIBE TO tens")
        .await
        .unwrap();
    assert_eq!(rows(&reader, "FETCH ALL FROM c").await.len(), 2);
    client
        .batch_execute("DROP MATERIALIZED VIEW tens")
        .await
        .unwrap();
    let e = try_rows(&reader, "FETCH 1 FROM c").await.unwrap_err();
    assert_eq!(code(&e), "55000");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_gets_an_error_and_the_view_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let reader = server.connect().await;
    reader
        .batch_execute("DECLARE c CURSOR FOR SUBSCRIBE TO tens WITH (snapshot = false)")
        .await
        .unwrap();
    // Each FLUSH publishes one change the cursor does not read.
    for i in 0..weir::stream::mv::FEED_CAPACITY + 2 {
        client
            .batch_execute(&format!("INSERT INTO t VALUES ({}, 1); FLUSH", 100 + i))
            .await
            .unwrap();
    }
    let e = try_rows(&reader, "FETCH ALL FROM c").await.unwrap_err();
    assert_eq!(code(&e), "53000", "{e}");
    let db = e.as_db_error().unwrap();
    assert!(db.message().contains("fell behind"), "{}", db.message());
    assert!(db.hint().unwrap().contains("SUBSCRIBE again"));
    // The view kept everything.
    assert_eq!(
        rows(&client, "SELECT count(*) FROM tens").await,
        [row(&[&(weir::stream::mv::FEED_CAPACITY + 4).to_string()])]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_alone_in_its_query_string() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let e = client
        .batch_execute("SELECT 1; SUBSCRIBE TO tens")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "0A000");
    server.stop().await;
}

/// A raw protocol connection, to send exactly what libpq sends for psycopg.
struct Raw {
    socket: TcpStream,
    buffer: BytesMut,
}

impl Raw {
    async fn connect(port: u16) -> Self {
        let mut raw = Raw {
            socket: TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
            buffer: BytesMut::new(),
        };
        let mut body = BytesMut::new();
        body.put_i32(196608);
        for s in ["user", "weir", "database", "weir", ""] {
            body.put_slice(s.as_bytes());
            body.put_u8(0);
        }
        let mut message = BytesMut::new();
        message.put_i32(body.len() as i32 + 4);
        message.put_slice(&body);
        raw.socket.write_all(&message).await.unwrap();
        raw.until_ready().await;
        raw
    }

    async fn send(&mut self, tag: u8, body: &[u8]) {
        let mut message = BytesMut::new();
        message.put_u8(tag);
        message.put_i32(body.len() as i32 + 4);
        message.put_slice(body);
        self.socket.write_all(&message).await.unwrap();
    }

    /// Messages up to ReadyForQuery, as (type, body); asynchronous ones left out.
    async fn until_ready(&mut self) -> Vec<(u8, BytesMut)> {
        let mut messages = vec![];
        loop {
            while self.buffer.len() < 5
                || self.buffer.len() < 1 + (&self.buffer[1..5]).get_i32() as usize
            {
                let n = tokio::time::timeout(WAIT, self.socket.read_buf(&mut self.buffer))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "server closed the connection");
            }
            let tag = self.buffer.get_u8();
            let len = self.buffer.get_i32() as usize - 4;
            let body = self.buffer.split_to(len);
            match tag {
                b'S' | b'N' | b'K' | b'R' => {}
                b'Z' => {
                    messages.push((tag, body));
                    return messages;
                }
                _ => messages.push((tag, body)),
            }
        }
    }

    async fn query(&mut self, sql: &str) -> Vec<(u8, BytesMut)> {
        self.send(b'Q', &cstr(sql)).await;
        self.until_ready().await
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn tags(messages: &[(u8, BytesMut)]) -> String {
    messages.iter().map(|(t, _)| *t as char).collect()
}

/// The text values of DataRow messages.
fn data_rows(messages: &[(u8, BytesMut)]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = messages
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, body)| {
            let mut body = &body[..];
            let n = body.get_i16();
            (0..n)
                .map(|_| {
                    let len = body.get_i32() as usize;
                    let value = String::from_utf8(body[..len].to_vec()).unwrap();
                    body.advance(len);
                    value
                })
                .collect()
        })
        .collect();
    out.sort();
    out
}

/// The field names of a RowDescription message.
fn field_names(body: &[u8]) -> Vec<String> {
    let mut body = body;
    let n = body.get_i16();
    (0..n)
        .map(|_| {
            let end = body.iter().position(|b| *b == 0).unwrap();
            let name = String::from_utf8(body[..end].to_vec()).unwrap();
            body.advance(end + 1 + 18);
            name
        })
        .collect()
}

/// psycopg 3's server-side cursor: `conn.cursor("c").execute("SUBSCRIBE TO tens")` then
/// `fetchmany(n)`, byte for byte as libpq sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_server_side_cursor_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    setup(&client).await;
    let mut raw = Raw::connect(server.port).await;
    assert_eq!(tags(&raw.query("BEGIN").await), "CZ");

    // DECLARE through PQsendQueryParams: Parse, Bind, Describe portal, Execute, Sync.
    raw.send(
        b'P',
        &[
            cstr(""),
            cstr("DECLARE \"c\" CURSOR FOR SUBSCRIBE TO tens"),
            vec![0, 0],
        ]
        .concat(),
    )
    .await;
    raw.send(
        b'B',
        &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 1, 0, 0]].concat(),
    )
    .await;
    raw.send(b'D', &[vec![b'P'], cstr("")].concat()).await;
    raw.send(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()).await;
    raw.send(b'S', &[]).await;
    let declared = raw.until_ready().await;
    assert_eq!(tags(&declared), "12nCZ");
    assert_eq!(&declared[3].1[..], b"DECLARE CURSOR\0");
    assert_eq!(&declared[4].1[..], b"T", "inside the transaction");

    // The cursor's shape: Describe portal "c".
    raw.send(b'D', &[vec![b'P'], cstr("c")].concat()).await;
    raw.send(b'S', &[]).await;
    let described = raw.until_ready().await;
    assert_eq!(tags(&described), "TZ");
    assert_eq!(field_names(&described[0].1), ["op", "k", "v10"]);

    // fetchmany(1) in text: a simple query.
    let fetched = raw.query("FETCH FORWARD 1 FROM \"c\"").await;
    assert_eq!(tags(&fetched), "TDCZ");
    assert_eq!(&fetched[2].1[..], b"FETCH 1\0");

    // The same over the extended protocol (what psycopg does for binary results).
    raw.send(
        b'P',
        &[cstr(""), cstr("FETCH FORWARD 5 FROM \"c\""), vec![0, 0]].concat(),
    )
    .await;
    raw.send(
        b'B',
        &[cstr(""), cstr(""), vec![0, 0, 0, 0, 0, 1, 0, 0]].concat(),
    )
    .await;
    raw.send(b'D', &[vec![b'P'], cstr("")].concat()).await;
    raw.send(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()).await;
    raw.send(b'S', &[]).await;
    let fetched = raw.until_ready().await;
    assert_eq!(tags(&fetched), "12TDCZ");
    assert_eq!(data_rows(&fetched).len(), 1);

    // A change arrives; the next fetch waits for it.
    client
        .batch_execute("INSERT INTO t VALUES (13, 13); FLUSH")
        .await
        .unwrap();
    let fetched = raw.query("FETCH FORWARD 5 FROM \"c\"").await;
    assert_eq!(data_rows(&fetched), [row(&["+I", "13", "130"])]);

    assert_eq!(tags(&raw.query("CLOSE \"c\"").await), "CZ");
    assert_eq!(tags(&raw.query("COMMIT").await), "CZ");
    server.stop().await;
}
