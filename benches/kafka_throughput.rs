//! Kafka → filter → Kafka throughput against librdkafka's mock cluster, end to end through
//! a Weir server started in this process.
//!
//! ```sh
//! cargo bench --bench kafka_throughput                          # 2 M messages, p=1 and 2
//! cargo bench --bench kafka_throughput -- --messages 1000000 --parallelism 1
//! cargo bench --bench kafka_throughput -- --guarantee write-ahead   # or transactional, none
//! WEIR_BENCH_SOURCE_OPTIONS=", 'properties.fetch.queue.backoff.ms' = '1000'" \
//!     cargo bench --bench kafka_throughput    # more WITH options for the source table
//! WEIR_BENCH_BLACKHOLE=1 cargo bench --bench kafka_throughput    # read into a blackhole
//! ```
//!
//! The input topic (32 partitions) is filled with JSON bids before the clock starts; the
//! job is `INSERT INTO out SELECT ... FROM bids WHERE price >= 5000` over a bounded read
//! ('scan.bounded.mode' = 'latest-offset') with `'table.dml-sync' = 'true'`, so the
//! statement returns when every input message was read and the sink flushed (or, in the
//! exactly-once modes, the last epoch committed). Half the messages pass the filter.
//! The mock brokers run in this process: the CPU time (getrusage, all threads) includes
//! theirs, so per-core figures are lower than against a real cluster.

use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{cpu_time, rows, TestServer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

/// librdkafka's mock brokers keep only the last few MB of each partition (about 50,000
/// of these messages): the input is spread wide enough to keep all of it.
const INPUT_PARTITIONS: i32 = 32;
const OUTPUT_PARTITIONS: i32 = 4;

struct Args {
    messages: u64,
    parallelism: Vec<usize>,
    guarantee: String,
    repeat: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        messages: 2_000_000,
        parallelism: vec![1, 2],
        guarantee: "at-least-once".into(),
        repeat: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--messages" => {
                a.messages = args
                    .next()
                    .expect("--messages N")
                    .replace('_', "")
                    .parse()
                    .expect("a number")
            }
            "--parallelism" => {
                a.parallelism = args
                    .next()
                    .expect("--parallelism 1,2")
                    .split(',')
                    .map(|p| p.trim().parse().expect("numbers"))
                    .collect()
            }
            "--guarantee" => a.guarantee = args.next().expect("--guarantee MODE"),
            "--repeat" => a.repeat = args.next().expect("--repeat N").parse().expect("a number"),
            _ => {}
        }
    }
    a
}

/// Fills the input topic: bid `i` has price `i % 10000`.
fn fill(bootstrap: &str, messages: u64) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for i in 0..messages {
        let value = format!(
            r#"{{"auction": {}, "bidder": {}, "price": {}, "date_time": "2024-01-01 00:00:{:02}.{:03}"}}"#,
            i % 1000,
            i % 7919,
            i % 10_000,
            (i / 1000) % 60,
            i % 1000
        );
        let mut record = BaseRecord::<(), str>::to("bids")
            .payload(&value)
            .partition((i % INPUT_PARTITIONS as u64) as i32);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
}

/// Messages written to a topic (the sum of its partitions' end offsets).
fn count(bootstrap: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("consumer");
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("offsets")
                .1
        })
        .sum()
}

fn main() {
    let args = parse_args();
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("bids", INPUT_PARTITIONS, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    eprintln!(
        "kafka_throughput: filling 'bids' with {} messages",
        args.messages
    );
    fill(&bootstrap, args.messages);
    let filled = count(&bootstrap, "bids", INPUT_PARTITIONS);
    assert_eq!(
        filled as u64, args.messages,
        "the input topic holds every message"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let sink_options = match args.guarantee.as_str() {
        "write-ahead" => {
            ", 'sink.delivery-guarantee' = 'exactly-once', 'sink.exactly-once.mode' = 'write-ahead'"
                .to_string()
        }
        "transactional" => ", 'sink.delivery-guarantee' = 'exactly-once', \
                             'sink.transactional-id-prefix' = 'bench'"
            .to_string(),
        other => format!(", 'sink.delivery-guarantee' = '{other}'"),
    };
    // (Diagnosis: WEIR_BENCH_BLACKHOLE=1 reads Kafka into a blackhole sink instead.)
    let blackhole = std::env::var("WEIR_BENCH_BLACKHOLE").is_ok();
    let source_options = std::env::var("WEIR_BENCH_SOURCE_OPTIONS").unwrap_or_default();
    let mut table = vec![];
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = TestServer::start(dir.path()).await;
        let client = server.connect().await;
        rows(
            &client,
            &format!(
                "CREATE TABLE bids (auction BIGINT, bidder BIGINT, price BIGINT, \
                 date_time TIMESTAMP(3)) WITH ('connector' = 'kafka', 'topic' = 'bids', \
                 'properties.bootstrap.servers' = '{bootstrap}', 'format' = 'json', \
                 'scan.bounded.mode' = 'latest-offset'{source_options})"
            ),
        )
        .await;
        rows(&client, "SET 'table.dml-sync' = 'true'").await;
        let mut n = 0;
        for &parallelism in &args.parallelism {
            rows(
                &client,
                &format!("SET 'parallelism.default' = '{parallelism}'"),
            )
            .await;
            let (mut walls, mut cpus) = (vec![], vec![]);
            for _ in 0..args.repeat {
                n += 1;
                let topic = format!("out{n}");
                cluster.create_topic(&topic, OUTPUT_PARTITIONS, 1).unwrap();
                let with = if blackhole {
                    "'connector' = 'blackhole'".to_string()
                } else {
                    format!(
                        "'connector' = 'kafka', 'topic' = '{topic}', \
                         'properties.bootstrap.servers' = '{bootstrap}', \
                         'format' = 'json'{sink_options}"
                    )
                };
                rows(
                    &client,
                    &format!(
                        "CREATE TABLE {topic} (auction BIGINT, bidder BIGINT, price BIGINT, \
                         date_time TIMESTAMP(3)) WITH ({with})"
                    ),
                )
                .await;
                let (wall0, cpu0) = (Instant::now(), cpu_time());
                rows(
                    &client,
                    &format!("INSERT INTO {topic} SELECT * FROM bids WHERE price >= 5000"),
                )
                .await;
                let (wall, cpu) = (wall0.elapsed(), cpu_time() - cpu0);
                let written = if blackhole {
                    args.messages as i64 / 2
                } else {
                    count(&bootstrap, &topic, OUTPUT_PARTITIONS)
                };
                eprintln!(
                    "p={parallelism}: {:.2} s wall, {:.2} s CPU, {written} messages out",
                    wall.as_secs_f64(),
                    cpu.as_secs_f64()
                );
                // Transaction markers take offsets too; at least the rows must be there.
                assert!(written as u64 >= args.messages / 2, "rows are missing");
                walls.push(wall);
                cpus.push(cpu);
            }
            walls.sort();
            cpus.sort();
            table.push((parallelism, walls[walls.len() / 2], cpus[cpus.len() / 2]));
        }
        server.stop().await;
    });
    println!(
        "\n| guarantee | parallelism | messages | wall (median) | messages/s | messages/s per CPU-second |"
    );
    println!("|---|---|---|---|---|---|");
    for (p, wall, cpu) in table {
        println!(
            "| {} | {p} | {} | {:.2} s | {:.0} | {:.0} |",
            args.guarantee,
            args.messages,
            wall.as_secs_f64(),
            args.messages as f64 / wall.as_secs_f64(),
            args.messages as f64 / cpu.as_secs_f64()
        );
    }
}
