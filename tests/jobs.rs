//! Continuous queries as a user drives them: INSERT jobs and materialized views, SHOW JOBS,
//! STOP JOB, FLUSH, and views and jobs that start again after a restart.

mod common;

use common::{rows, TestServer};

const BIDS: &str = "CREATE TABLE bids (auction INT, price INT, ts TIMESTAMP(3), \
                    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)";

async fn insert_bids(client: &tokio_postgres::Client, from_second: u32, to_second: u32) {
    let values: Vec<String> = (from_second..to_second)
        .map(|s| {
            format!(
                "({}, {}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{s} seconds')",
                s % 3,
                s
            )
        })
        .collect();
    client
        .batch_execute(&format!("INSERT INTO bids VALUES {}", values.join(", ")))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_views_are_listed_stopped_and_resumed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client.batch_execute(BIDS).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE per_window (window_start TIMESTAMP(3), auction INT, bids BIGINT);
             CREATE MATERIALIZED VIEW totals AS
               SELECT window_start, window_end, count(*) AS bids, sum(price) AS revenue
               FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND))
               GROUP BY window_start, window_end",
        )
        .await
        .unwrap();
    // An INSERT job returns its id at once.
    let job = rows(
        &client,
        "INSERT INTO per_window SELECT window_start, auction, count(*)
         FROM TABLE(TUMBLE(TABLE bids, DESCRIPTOR(ts), INTERVAL '10' SECOND))
         GROUP BY window_start, window_end, auction",
    )
    .await;
    let job_id = job[0][0].clone();
    assert_eq!(job_id.len(), 16, "{job:?}");

    insert_bids(&client, 0, 25).await;
    client.batch_execute("FLUSH").await.unwrap();
    // Windows [0, 10) and [10, 20) have closed (watermark 23).
    let expected_totals = vec![
        vec![
            "2024-01-01 00:00:00.000000".to_string(),
            "10".into(),
            "45".into(),
        ],
        vec![
            "2024-01-01 00:00:10.000000".to_string(),
            "10".into(),
            "145".into(),
        ],
    ];
    let totals = "SELECT window_start, bids, revenue FROM totals ORDER BY window_start";
    assert_eq!(rows(&client, totals).await, expected_totals);
    let per_window = "SELECT window_start, auction, bids FROM per_window ORDER BY 1, 2";
    assert_eq!(rows(&client, per_window).await.len(), 6);

    let jobs = rows(&client, "SHOW JOBS").await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let insert_job = jobs
        .iter()
        .find(|j| j[0] == job_id)
        .expect("the INSERT job is listed");
    assert!(
        insert_job[1].starts_with("INSERT INTO per_window"),
        "{insert_job:?}"
    );
    assert_eq!(insert_job[2], "RUNNING");
    assert_eq!(insert_job[3], "25", "rows in: {insert_job:?}");
    assert_eq!(insert_job[4], "6", "rows out: {insert_job:?}");
    assert_eq!(
        insert_job[5], "2024-01-01 00:00:23.000000",
        "watermark: {insert_job:?}"
    );
    assert_eq!(insert_job[6], "0", "late rows: {insert_job:?}");

    // A late row is counted.
    client
        .batch_execute("INSERT INTO bids VALUES (1, 1000, TIMESTAMP '2024-01-01 00:00:05'); FLUSH")
        .await
        .unwrap();
    let jobs = rows(&client, "SHOW JOBS").await;
    println!("JOBS {jobs:?}");
    assert!(jobs.iter().all(|j| j[6] == "1"), "{jobs:?}");

    // The sink cannot be dropped while the job writes to it.
    let e = client
        .batch_execute("DROP TABLE per_window")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "2BP01", "{e}");

    server.stop().await;

    // After a restart the view and the job resume from their last checkpoints.
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    insert_bids(&client, 25, 40).await;
    client.batch_execute("FLUSH").await.unwrap();
    let mut expected = expected_totals.clone();
    expected.push(vec![
        "2024-01-01 00:00:20.000000".to_string(),
        "10".into(),
        "245".into(),
    ]);
    assert_eq!(rows(&client, totals).await, expected);
    // The job resumed from its last checkpoint: its first windows are not written again,
    // only the new one is.
    let written = rows(&client, per_window).await;
    assert_eq!(written.len(), 6 + 3, "{written:?}");

    let e = client.batch_execute("STOP JOB 'nope'").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42704");
    client
        .batch_execute(&format!("STOP JOB '{job_id}'"))
        .await
        .unwrap();
    assert_eq!(rows(&client, "SHOW JOBS").await.len(), 1);
    client.batch_execute("DROP TABLE per_window").await.unwrap();
    client
        .batch_execute("DROP MATERIALIZED VIEW totals")
        .await
        .unwrap();
    assert!(rows(&client, "SHOW JOBS").await.is_empty());
    server.stop().await;

    // Stopped jobs and dropped views stay gone.
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert!(rows(&client, "SHOW JOBS").await.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dml_sync_waits_for_a_bounded_job_and_reports_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '1000',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '1000');
             CREATE TABLE copy (id BIGINT);
             SET 'table.dml-sync' = 'true';
             INSERT INTO copy SELECT id FROM gen WHERE id % 10 = 0",
        )
        .await
        .unwrap();
    assert_eq!(
        rows(&client, "SELECT count(*), sum(id) FROM copy").await,
        vec![vec!["100".to_string(), "50500".into()]]
    );
    // A finished synchronous job is not left in SHOW JOBS.
    assert!(rows(&client, "SHOW JOBS").await.is_empty());
    let e = client
        .batch_execute("INSERT INTO copy SELECT 10 / (id - id) FROM gen")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012", "{e}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_job_is_listed_but_not_run_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '10',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '10');
             CREATE TABLE out (id BIGINT);",
        )
        .await
        .unwrap();
    rows(&client, "INSERT INTO out SELECT id FROM gen").await;
    assert_eq!(finished_job(&client).await[2], "FINISHED");
    assert_eq!(
        rows(&client, "SELECT count(*) FROM out").await,
        vec![vec!["10".to_string()]]
    );
    // Give the catalog a moment to forget the finished job.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    server.stop().await;

    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    assert!(rows(&client, "SHOW JOBS").await.is_empty());
    assert_eq!(
        rows(&client, "SELECT count(*) FROM out").await,
        vec![vec!["10".to_string()]]
    );
    server.stop().await;
}

/// Waits for the only job to finish and gives its SHOW JOBS row.
async fn finished_job(client: &tokio_postgres::Client) -> Vec<String> {
    for _ in 0..200 {
        let jobs = rows(client, "SHOW JOBS").await;
        if jobs[0][2] == "FINISHED" {
            return jobs[0].clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "the job did not finish: {:?}",
        rows(client, "SHOW JOBS").await
    );
}

/// A blackhole naming its time column counts each row's latency from that time to its
/// arrival; SHOW JOBS gives the 50th and 99th percentiles (NULL when nothing was counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_jobs_reports_sink_latency_from_the_named_time_column() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '100',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '100');
             CREATE TABLE hole (id BIGINT, ts TIMESTAMP(3))
               WITH ('connector' = 'blackhole', 'latency.column' = 'ts');
             CREATE TABLE plain_hole (id BIGINT, ts TIMESTAMP(3)) WITH ('connector' = 'blackhole');",
        )
        .await
        .unwrap();
    // Rows timed in the future arrive with no latency; NULL times are not counted.
    rows(
        &client,
        "INSERT INTO hole SELECT id, CASE WHEN id % 2 = 0 THEN TIMESTAMP '2200-01-01 00:00:00' END FROM gen",
    )
    .await;
    let job = finished_job(&client).await;
    assert_eq!(job[4], "100", "rows_out");
    assert_eq!(job[9..], ["0".to_string(), "0".into()], "{job:?}");
    rows(&client, &format!("STOP JOB '{}'", job[0])).await;

    // Rows from the year 2000 are decades late.
    rows(
        &client,
        "INSERT INTO hole SELECT id, TIMESTAMP '2000-01-01 00:00:00' FROM gen",
    )
    .await;
    let job = finished_job(&client).await;
    let decades_ms = 20 * 365 * 24 * 3600 * 1000_i64;
    for p in &job[9..] {
        assert!(p.parse::<i64>().unwrap() > decades_ms, "{job:?}");
    }
    rows(&client, &format!("STOP JOB '{}'", job[0])).await;

    // Without the option nothing is measured.
    rows(&client, "INSERT INTO plain_hole SELECT id, NULL FROM gen").await;
    let job = finished_job(&client).await;
    assert_eq!(job[9..], ["NULL".to_string(), "NULL".into()], "{job:?}");
    server.stop().await;
}

/// The nexmark generator paced from a base time of now emits bids at their event time, so
/// a pass-through's latency is the engine's own: well under a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_pass_through_reaches_the_sink_within_milliseconds_of_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    client
        .batch_execute(&format!(
            "CREATE TABLE bid (auction BIGINT, price BIGINT, date_time TIMESTAMP(3)) WITH (
               'connector' = 'nexmark', 'nexmark.table' = 'bid', 'nexmark.event.num' = '10000',
               'nexmark.events-per-second' = '10000', 'nexmark.first-event-rate' = '10000',
               'nexmark.base-time' = '{now_ms}');
             CREATE TABLE hole (auction BIGINT, price BIGINT, date_time TIMESTAMP(3))
               WITH ('connector' = 'blackhole', 'latency.column' = 'date_time');
             INSERT INTO hole SELECT auction, price, date_time FROM bid;"
        ))
        .await
        .unwrap();
    let job = finished_job(&client).await;
    assert_eq!(job[4], "9200", "rows_out");
    let p50: i64 = job[9].parse().unwrap();
    let p99: i64 = job[10].parse().unwrap();
    assert!(p50 <= p99 && p99 < 1000, "{job:?}");
    server.stop().await;
}

/// A view over bounded inputs that read them all keeps its rows across restarts: its
/// ended tasks end again without their operators emitting anything (a global
/// aggregate's row for no input came out once, long ago), over generated rows and over
/// a directory that got another file meanwhile (its source had finished the files it
/// listed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_that_read_bounded_inputs_keeps_its_rows_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.csv"), "1\n2\n3\n").unwrap();
    std::fs::write(files.join("b.csv"), "4\n5\n").unwrap();
    let server = TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "SET 'parallelism.default' = '2';
             CREATE TABLE f (id BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}',
               'format' = 'csv');
             CREATE TABLE g (id BIGINT) WITH ('connector' = 'datagen',
               'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '5');
             CREATE MATERIALIZED VIEW of_files AS SELECT count(*) AS n, sum(id) AS s FROM f;
             CREATE MATERIALIZED VIEW generated AS SELECT count(*) AS n, sum(id) AS s FROM g;",
            files.display()
        ))
        .await
        .unwrap();
    let five = vec![vec!["5".to_string(), "15".to_string()]];
    let both = |client: tokio_postgres::Client| async move {
        let of_files = rows(&client, "SELECT n, s FROM of_files").await;
        let generated = rows(&client, "SELECT n, s FROM generated").await;
        (client, of_files, generated)
    };
    let mut client = client;
    for _ in 0..200 {
        client.batch_execute("FLUSH").await.unwrap();
        let (c, of_files, generated) = both(client).await;
        client = c;
        if of_files == five && generated == five {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, of_files, generated) = both(client).await;
    assert_eq!((of_files, generated), (five.clone(), five.clone()));
    server.stop().await;

    // A file sorting first: file 0 of the new listing is another file.
    std::fs::write(files.join("0.csv"), "100\n").unwrap();
    for _ in 0..2 {
        let server = TestServer::start(dir.path()).await;
        let client = server.connect().await;
        client.batch_execute("FLUSH").await.unwrap();
        let (client, of_files, generated) = both(client).await;
        assert_eq!((of_files, generated), (five.clone(), five.clone()));
        let jobs = rows(&client, "SHOW JOBS").await;
        assert!(jobs.iter().all(|j| j[2] == "FINISHED"), "{jobs:?}");
        server.stop().await;
    }
}
