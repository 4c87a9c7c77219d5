//! The Postgres wire protocol as clients use it, and as rude clients abuse it.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::ErrorPosition;
use tokio_postgres::types::Type;

use common::{rows, TestServer};

fn startup_message() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for s in ["user", "weir", "database", "weir"] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend(body);
    msg
}

/// Connects and completes start-up by hand, for tests that then misbehave.
async fn raw_session(port: u16) -> TcpStream {
    let mut socket = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    socket.write_all(&startup_message()).await.unwrap();
    read_until_ready(&mut socket).await;
    socket
}

/// Sends a simple-protocol Query message without waiting for the answer.
async fn send_simple_query(socket: &mut TcpStream, sql: &str) {
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    msg.extend_from_slice(sql.as_bytes());
    msg.push(0);
    socket.write_all(&msg).await.unwrap();
}

async fn read_until_ready(socket: &mut TcpStream) {
    message_types_until_ready(socket).await;
}

/// True once the server has closed the socket (EOF or reset), within a few seconds.
async fn closed_by_server(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn still_serves(server: &TestServer) {
    let client = server.connect().await;
    assert_eq!(
        rows(&client, "SELECT 40 + 2").await,
        vec![vec!["42".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_errors_carry_their_position_in_the_query() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    let err = client.simple_query("SELECT 1; SELEC 2").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert_eq!(db.position(), Some(&ErrorPosition::Original(11)));
    let err = client.prepare("SELECT * FROM t WHERE").await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert_eq!(db.position(), Some(&ErrorPosition::Original(22)));
    // Positions count lines too, in Weir's own DDL.
    let err = client
        .simple_query("CREATE TABLE t (\n  a INT,\n  b INT NOT NOT NULL\n)")
        .await
        .unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "42601");
    assert_eq!(db.position(), Some(&ErrorPosition::Original(35)));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_binds_parameters_and_describes_results() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT NOT NULL, name STRING, price DECIMAL(10, 2), \
             day DATE, at TIMESTAMP(6), ok BOOLEAN, raw BYTES, ratio DOUBLE)",
        )
        .await
        .unwrap();
    let insert = client
        .prepare("INSERT INTO t (id, name, ok, ratio) VALUES ($1, $2, $3, $4)")
        .await
        .unwrap();
    assert_eq!(
        insert.params(),
        &[Type::INT8, Type::TEXT, Type::BOOL, Type::FLOAT8]
    );
    for i in 0..3i64 {
        let n = client
            .execute(
                &insert,
                &[&i, &format!("n{i}"), &(i % 2 == 0), &(i as f64 / 4.0)],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
    client
        .batch_execute(
            "INSERT INTO t VALUES (9, 'full', 12.34, '2024-03-04', '2024-03-04 05:06:07.089', NULL, X'00ff', 0.5)",
        )
        .await
        .unwrap();

    let select = client
        .prepare(
            "SELECT id, name, price, day, at, ok, raw, ratio FROM t WHERE id >= $1 ORDER BY id",
        )
        .await
        .unwrap();
    assert_eq!(select.params(), &[Type::INT8]);
    let types: Vec<Type> = select.columns().iter().map(|c| c.type_().clone()).collect();
    assert_eq!(
        types,
        vec![
            Type::INT8,
            Type::TEXT,
            Type::NUMERIC,
            Type::DATE,
            Type::TIMESTAMP,
            Type::BOOL,
            Type::BYTEA,
            Type::FLOAT8
        ]
    );
    let names: Vec<&str> = select.columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        vec!["id", "name", "price", "day", "at", "ok", "raw", "ratio"]
    );

    let found = client.query(&select, &[&2i64]).await.unwrap();
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].get::<_, i64>(0), 2);
    assert_eq!(found[0].get::<_, String>(1), "n2");
    assert!(found[0].get::<_, bool>(5));
    assert_eq!(found[0].get::<_, f64>(7), 0.5);
    let full = &found[1];
    assert_eq!(full.get::<_, rust_decimal::Decimal>(2).to_string(), "12.34");
    assert_eq!(
        full.get::<_, chrono::NaiveDate>(3),
        chrono::NaiveDate::from_ymd_opt(2024, 3, 4).unwrap()
    );
    assert_eq!(
        full.get::<_, chrono::NaiveDateTime>(4).to_string(),
        "2024-03-04 05:06:07.089"
    );
    assert_eq!(full.get::<_, Option<bool>>(5), None);
    assert_eq!(full.get::<_, Vec<u8>>(6), vec![0x00, 0xff]);

    // A statement prepared once runs many times with different parameters.
    let count = client
        .prepare("SELECT count(*) FROM t WHERE name = $1")
        .await
        .unwrap();
    for (name, expected) in [("n0", 1i64), ("missing", 0)] {
        let row = client.query_one(&count, &[&name]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), expected);
    }
    // Errors in the extended protocol carry SQLSTATEs too.
    let err = client.prepare("SELECT nope FROM t").await.unwrap_err();
    assert_eq!(err.code().unwrap().code(), "42703");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_query_hurts_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute("CREATE TABLE t (a BIGINT)")
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t SELECT value FROM generate_series(1, 20000)")
        .await
        .unwrap();
    for _ in 0..5 {
        let mut socket = raw_session(server.port).await;
        send_simple_query(
            &mut socket,
            "SELECT a, a * 2, a::TEXT FROM t CROSS JOIN (SELECT 1) ORDER BY a DESC",
        )
        .await;
        drop(socket);
    }
    still_serves(&server).await;
    assert_eq!(
        rows(&client, "SELECT count(*) FROM t").await,
        vec![vec!["20000".to_string()]]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // Garbage instead of a start-up message.
    let mut socket = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    socket
        .write_all(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_server(&mut socket).await);
    // Garbage after a proper start-up: an unknown message type.
    let mut socket = raw_session(server.port).await;
    socket.write_all(b"\xfe\x00\x00\x00\x08junk").await.unwrap();
    assert!(closed_by_server(&mut socket).await);
    still_serves(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gibibyte_message_is_refused_without_reading_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    // As a start-up packet...
    let mut socket = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    socket.write_all(&(1i32 << 30).to_be_bytes()).await.unwrap();
    socket.write_all(&196608i32.to_be_bytes()).await.unwrap();
    assert!(closed_by_server(&mut socket).await);
    // ...and as a query after start-up.
    let mut socket = raw_session(server.port).await;
    socket.write_all(b"Q").await.unwrap();
    socket.write_all(&(1i32 << 30).to_be_bytes()).await.unwrap();
    socket.write_all(b"SELECT 1").await.unwrap();
    assert!(closed_by_server(&mut socket).await);
    still_serves(&server).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_connections_all_get_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let setup = server.connect().await;
    setup.batch_execute("CREATE TABLE t (a INT)").await.unwrap();
    setup
        .batch_execute("INSERT INTO t VALUES (1), (2), (3)")
        .await
        .unwrap();
    let port = server.port;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let client = common::connect(port).await;
                let row = client
                    .query_one("SELECT sum(a) + $1::INT FROM t", &[&i])
                    .await
                    .unwrap();
                row.get::<_, i64>(0)
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), 6 + i as i64);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_query() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    let cancel = client.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let err = client
        .simple_query("SELECT count(*) FROM generate_series(1, 5000000000)")
        .await
        .unwrap_err();
    canceller.await.unwrap();
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(rows(&client, "SELECT 1").await, vec![vec!["1".to_string()]]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_turns_on_scram_and_a_wrong_one_is_28p01() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_password(dir.path(), Some("s3cret")).await;
    let connect = |password: &'static str| {
        let port = server.port;
        async move {
            tokio_postgres::connect(
                &format!("host=127.0.0.1 port={port} user=anyone dbname=weir password={password}"),
                tokio_postgres::NoTls,
            )
            .await
        }
    };
    let err = connect("wrong")
        .await
        .err()
        .expect("wrong password is refused");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    let (client, connection) = connect("s3cret").await.expect("right password works");
    tokio::spawn(connection);
    assert_eq!(rows(&client, "SELECT 7").await, vec![vec!["7".to_string()]]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_columns_are_named_as_postgres_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute("CREATE TABLE t (a INT, b STRING); INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    let sql = "SELECT 1, a, t.b, count(*), upper(b), a AS renamed, count(a) FROM t GROUP BY a, t.b";
    let expected = vec!["?column?", "a", "b", "count", "upper", "renamed", "count"];
    // Extended protocol: Describe gives the names before execution.
    let prepared = client.prepare(sql).await.unwrap();
    let names: Vec<&str> = prepared.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, expected);
    let rows = client.query(&prepared, &[]).await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(3), 1);
    // Simple protocol.
    let messages = client.simple_query(sql).await.unwrap();
    let Some(tokio_postgres::SimpleQueryMessage::RowDescription(desc)) = messages.first() else {
        panic!("no row description: {messages:?}");
    };
    let names: Vec<&str> = desc.iter().map(|c| c.name()).collect();
    assert_eq!(names, expected);
    server.stop().await;
}

/// Reads backend messages up to ReadyForQuery; returns their type bytes in order.
async fn message_types_until_ready(socket: &mut TcpStream) -> Vec<u8> {
    let mut types = vec![];
    loop {
        let tag = socket.read_u8().await.expect("server answers");
        let len = socket.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        socket.read_exact(&mut body).await.unwrap();
        types.push(tag);
        if tag == b'Z' {
            return types;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_mid_string_keeps_the_results_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute("CREATE TABLE t (a INT); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mut socket = raw_session(server.port).await;
    send_simple_query(&mut socket, "SELECT 1; SELECT a / (a - 1) FROM t; SELECT 2").await;
    // RowDescription, DataRow, CommandComplete for the first; an error for the second;
    // nothing for the third, as in Postgres.
    assert_eq!(
        message_types_until_ready(&mut socket).await,
        b"TDCEZ".to_vec()
    );
    server.stop().await;
}
