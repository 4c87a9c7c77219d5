//! Kafka → TUMBLE aggregate → Kafka, exactly once: the server is SIGKILLed again and
//! again while input flows into the source topic, and a plain consumer of the output
//! topic ('write-ahead' exactly-once mode) must see every closed window once, with the
//! right values. The brokers are librdkafka's mock cluster, in this test's process.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, WeirProcess};
use rand::{RngExt, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

const PARTITIONS: i32 = 4;
/// Event time advances 5 ms per input row: 200 rows per one-second window.
const STEP_MS: i64 = 5;
const BASE_MS: i64 = 1_700_000_000_000;

/// Input row `i`: user, amount and event time; rows go round-robin to the partitions, so
/// each partition's times only grow and no row is ever late.
fn row(i: u64) -> (i32, String) {
    let ts = BASE_MS + i as i64 * STEP_MS;
    let time = chrono::DateTime::from_timestamp_millis(ts)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S%.3f");
    (
        (i % PARTITIONS as u64) as i32,
        format!(r#"{{"id": {i}, "amount": {}, "ts": "{time}"}}"#, i % 7),
    )
}

/// Writes input rows until told to stop, at about `rate` rows a second.
fn feed(
    bootstrap: String,
    rate: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let started = std::time::Instant::now();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            let (partition, value) = row(i);
            producer
                .send(
                    BaseRecord::<str, str>::to("clicks")
                        .partition(partition)
                        .payload(&value),
                )
                .map_err(|(e, _)| e)
                .unwrap();
            i += 1;
            sent.store(i, Ordering::Relaxed);
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    })
}

/// (n, total) per window start (ms) of the first `rows` input rows.
fn expected(rows: u64) -> BTreeMap<i64, (u64, u64)> {
    let mut out = BTreeMap::new();
    for i in 0..rows {
        let ts = BASE_MS + i as i64 * STEP_MS;
        let e = out.entry(ts - ts.rem_euclid(1000)).or_insert((0, 0));
        e.0 += 1;
        e.1 += i % 7;
    }
    out
}

/// Every message of the output topic as (window start ms, n, total).
fn output(bootstrap: &str) -> Vec<(i64, u64, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "checker")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset("windows", p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = vec![];
    let mut eof = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while eof < 2 && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                let start = chrono::NaiveDateTime::parse_from_str(
                    v["window_start"].as_str().unwrap(),
                    "%Y-%m-%d %H:%M:%S%.f",
                )
                .unwrap()
                .and_utc()
                .timestamp_millis();
                out.push((
                    start,
                    v["n"].as_u64().unwrap(),
                    v["total"].as_u64().unwrap(),
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("{e}"),
            None => {}
        }
    }
    out
}

async fn create_pipeline(port: u16, bootstrap: &str) {
    let client = connect(port).await;
    for s in [
        "SET 'parallelism.default' = '2'".to_string(),
        "SET 'execution.checkpointing.interval' = '300 ms'".to_string(),
        format!(
            "CREATE TABLE clicks (id BIGINT, amount BIGINT, ts TIMESTAMP(3), \
             WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH ('connector' = 'kafka', \
             'topic' = 'clicks', 'properties.bootstrap.servers' = '{bootstrap}', \
             'format' = 'json', 'scan.startup.mode' = 'earliest-offset')"
        ),
        format!(
            "CREATE TABLE windows (window_start TIMESTAMP(3), n BIGINT, total BIGINT) WITH \
             ('connector' = 'kafka', 'topic' = 'windows', 'properties.bootstrap.servers' = \
             '{bootstrap}', 'format' = 'json', 'sink.delivery-guarantee' = 'exactly-once', \
             'sink.exactly-once.mode' = 'write-ahead')"
        ),
        "INSERT INTO windows SELECT window_start, count(*), sum(amount) FROM \
         TABLE(TUMBLE(TABLE clicks, DESCRIPTOR(ts), INTERVAL '1' SECOND)) \
         GROUP BY window_start, window_end"
            .to_string(),
    ] {
        client
            .simple_query(&s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_closed_window_once_through_twelve_kills() {
    let seed = std::env::var("WEIR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11u64);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("clicks", PARTITIONS, 1).unwrap();
    cluster.create_topic("windows", 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();

    let weir = WeirProcess::start(dir.path());
    create_pipeline(weir.port, &bootstrap).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let feeder = feed(bootstrap.clone(), 1500, stop.clone(), sent.clone());
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
    weir.kill_9();
    for round in 0..12 {
        // Every other run dies half-way through writing a committed epoch's messages:
        // the commit redone at its start (@1) or the next one (@2).
        let env: &[(&str, &str)] = match round % 4 {
            1 => &[("WEIR_FAILPOINTS", "kafka-commit-midway=crash@1")],
            3 => &[("WEIR_FAILPOINTS", "kafka-commit-midway=crash@2")],
            _ => &[],
        };
        let weir = WeirProcess::try_start_with_env(dir.path(), env);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        // (None: it crashed redoing the commit it restarted from, before it listened.)
        drop(weir);
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let rows = sent.load(Ordering::Relaxed);
    // A last row far ahead in every partition closes every window of the input.
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for p in 0..PARTITIONS {
        let (_, value) = row(rows + 1_000_000);
        producer
            .send(
                BaseRecord::<str, str>::to("clicks")
                    .partition(p)
                    .payload(&value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let weir = WeirProcess::start(dir.path());
    let want = expected(rows);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut got = output(&bootstrap);
    while got.len() < want.len() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        got = output(&bootstrap);
    }
    // Let anything that would come twice come.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = output(&bootstrap);
    drop(weir);
    let mut seen: BTreeMap<i64, Vec<(u64, u64)>> = BTreeMap::new();
    for (start, n, total) in got {
        seen.entry(start).or_default().push((n, total));
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(doubled.is_empty(), "windows written twice: {doubled:?}");
    let seen: BTreeMap<i64, (u64, u64)> = seen.into_iter().map(|(k, v)| (k, v[0])).collect();
    assert!(want.len() > 10, "only {} windows of input", want.len());
    assert_eq!(seen, want, "{rows} input rows");
}

/// A running view over a Kafka topic told to skip bad records counts them in SHOW JOBS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_bad_records_are_counted_in_show_jobs() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("mixed", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for value in [r#"{"id": 1}"#, "{oops", r#"{"id": "two"}"#, r#"{"id": 3}"#] {
        producer
            .send(
                BaseRecord::<str, str>::to("mixed")
                    .partition(0)
                    .payload(value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = common::TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE mixed (id BIGINT) WITH ('connector' = 'kafka', 'topic' = 'mixed', \
             'properties.bootstrap.servers' = '{bootstrap}', 'format' = 'json', \
             'json.ignore-parse-errors' = 'true'); \
             CREATE MATERIALIZED VIEW ids AS SELECT id FROM mixed"
        ))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        client.batch_execute("FLUSH").await.unwrap();
        let ids = common::rows(&client, "SELECT id FROM ids ORDER BY id").await;
        let jobs = client.simple_query("SHOW JOBS").await.unwrap();
        let skipped = jobs
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    row.get("bad_records_skipped").map(String::from)
                }
                _ => None,
            })
            .unwrap();
        if ids.len() == 2 && skipped == "2" {
            assert_eq!(ids, vec![vec!["1".to_string()], vec!["3".to_string()]]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ids {ids:?}, skipped {skipped}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}

/// A view over a Kafka topic of four partitions, moved in place to other parallelisms
/// (its source's partitions dealt anew to the new number of splits) and restarted: every
/// record is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_view_rescaled_in_place_counts_every_record_once() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("events", PARTITIONS, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let send = |from: u64, to: u64| {
        for i in from..to {
            let value = format!(r#"{{"k": {}, "v": {i}}}"#, i % 5);
            producer
                .send(
                    BaseRecord::<str, str>::to("events")
                        .partition((i % PARTITIONS as u64) as i32)
                        .payload(&value),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
    };
    // (k, count, sum of v) of records 0..n.
    let expected = |n: u64| -> Vec<Vec<String>> {
        (0..5)
            .map(|k| {
                let vs: Vec<u64> = (0..n).filter(|i| i % 5 == k).collect();
                vec![
                    k.to_string(),
                    vs.len().to_string(),
                    vs.iter().sum::<u64>().to_string(),
                ]
            })
            .collect()
    };
    // Waits for the view to count `n` records, then for anything that would come twice.
    async fn counted(client: &tokio_postgres::Client, n: u64) -> Vec<Vec<String>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            client.batch_execute("FLUSH").await.unwrap();
            let total = common::rows(client, "SELECT coalesce(sum(n), 0) FROM per_k").await;
            if total[0][0] == n.to_string() || std::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.batch_execute("FLUSH").await.unwrap();
        common::rows(client, "SELECT k, n, total FROM per_k ORDER BY k").await
    }

    let dir = tempfile::tempdir().unwrap();
    let server = common::TestServer::start(dir.path()).await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "SET 'parallelism.default' = '2'; \
             SET 'execution.checkpointing.interval' = '200 ms'; \
             CREATE TABLE events (k BIGINT, v BIGINT) WITH ('connector' = 'kafka', \
             'topic' = 'events', 'properties.bootstrap.servers' = '{bootstrap}', \
             'format' = 'json', 'scan.startup.mode' = 'earliest-offset'); \
             CREATE MATERIALIZED VIEW per_k AS \
             SELECT k, count(*) AS n, sum(v) AS total FROM events GROUP BY k"
        ))
        .await
        .unwrap();
    send(0, 100);
    assert_eq!(counted(&client, 100).await, expected(100));
    for (parallelism, from, to) in [(4, 100, 200), (3, 200, 300), (1, 300, 350)] {
        client
            .batch_execute(&format!(
                "ALTER MATERIALIZED VIEW per_k SET PARALLELISM = {parallelism}"
            ))
            .await
            .unwrap();
        assert_eq!(
            counted(&client, from).await,
            expected(from),
            "moved to {parallelism}"
        );
        send(from, to);
        assert_eq!(counted(&client, to).await, expected(to), "at {parallelism}");
    }
    // A restart resumes at the last parallelism, from the merged places.
    server.stop().await;
    let server = common::TestServer::start(dir.path()).await;
    let client = server.connect().await;
    send(350, 400);
    assert_eq!(counted(&client, 400).await, expected(400));
    client
        .batch_execute("ALTER MATERIALIZED VIEW per_k SET PARALLELISM = 2")
        .await
        .unwrap();
    send(400, 450);
    assert_eq!(counted(&client, 450).await, expected(450));
    server.stop().await;
}
