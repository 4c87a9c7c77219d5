//! The Kafka connectors against librdkafka's mock cluster (no broker needed).

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::Int32Type;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use weir_catalog::{op, SqlType, TableDef};

use super::sink::{KafkaSink, WriteAhead};
use super::source::KafkaSource;
use crate::connector::factory::test_util::table;
use crate::connector::io::{EpochWriter, SinkRows, SinkWriter, SplitReader};
use crate::stream::checkpoint::Precommit;
use crate::stream::message::ChangeBatch;

pub(crate) type Cluster = MockCluster<'static, DefaultProducerContext>;

pub(crate) fn cluster(topics: &[(&str, i32)]) -> Cluster {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (t, partitions) in topics {
        cluster.create_topic(t, *partitions, 1).expect("topic");
    }
    cluster
}

/// Messages (partition, key, value, timestamp ms) written to a topic and flushed.
pub(crate) fn produce(
    bootstrap: &str,
    topic: &str,
    messages: &[(i32, Option<&str>, Option<&str>, i64)],
) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    for (p, k, v, ts) in messages {
        let mut r: BaseRecord<'_, str, str> = BaseRecord::to(topic).partition(*p).timestamp(*ts);
        if let Some(k) = k {
            r = r.key(*k);
        }
        if let Some(v) = v {
            r = r.payload(*v);
        }
        producer.send(r).map_err(|(e, _)| e).expect("send");
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// Every message of a topic: (partition, key, value, headers as "k=v,...").
pub(crate) fn consume_all(
    bootstrap: &str,
    topic: &str,
) -> Vec<(i32, Option<String>, Option<String>, String)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "test-reader")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata.topics()[0].partitions().len();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = vec![];
    let mut eof = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while eof < partitions && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                format!(
                                    "{}={}",
                                    h.key,
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                out.push((
                    m.partition(),
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    m.payload().map(|v| String::from_utf8_lossy(v).into_owned()),
                    headers,
                ));
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => eof += 1,
            Some(Err(e)) => panic!("{e}"),
            None => {}
        }
    }
    assert_eq!(eof, partitions, "read every partition to its end");
    out
}

fn kafka_table(bootstrap: &str, columns: &[(&str, SqlType)], options: &[(&str, &str)]) -> TableDef {
    let mut all = vec![
        ("connector", "kafka"),
        ("properties.bootstrap.servers", bootstrap),
    ];
    all.extend_from_slice(options);
    table(columns, &all)
}

fn cols() -> Vec<(&'static str, SqlType)> {
    vec![("id", SqlType::Int), ("name", SqlType::Varchar(None))]
}

/// Reads a bounded source to its end.
async fn read_to_end(source: &mut KafkaSource) -> Vec<ChangeBatch> {
    let mut out = vec![];
    while let Some(b) = tokio::time::timeout(Duration::from_secs(30), source.next_batch())
        .await
        .expect("the bounded read ends")
        .unwrap()
    {
        out.push(b);
    }
    out
}

fn ids(batches: &[ChangeBatch]) -> Vec<i32> {
    let mut ids: Vec<i32> = batches
        .iter()
        .flat_map(|b| {
            b.rows
                .column(0)
                .as_primitive::<Int32Type>()
                .iter()
                .map(|v| v.unwrap_or(-1))
                .collect::<Vec<_>>()
        })
        .collect();
    ids.sort();
    ids
}

fn json(id: i32, name: &str) -> String {
    format!(r#"{{"id": {id}, "name": "{name}"}}"#)
}

/// Ten JSON rows, ids 0..10, spread over four partitions with timestamps 1000 * (id + 1)
/// (librdkafka takes a timestamp of 0 for "now").
fn ten_rows(bootstrap: &str, topic: &str) {
    let values: Vec<String> = (0..10).map(|i| json(i, &format!("n{i}"))).collect();
    let messages: Vec<_> = (0..10)
        .map(|i| {
            (
                i % 4,
                None,
                Some(values[i as usize].as_str()),
                1000 * (i as i64 + 1),
            )
        })
        .collect();
    produce(bootstrap, topic, &messages);
}

#[tokio::test]
async fn startup_modes_and_partitions_over_subtasks() {
    let cluster = cluster(&[("t", 4)]);
    let bs = cluster.bootstrap_servers();
    ten_rows(&bs, "t");
    let read = |options: Vec<(&'static str, &'static str)>, split: usize, splits: usize| {
        let mut o = vec![
            ("topic", "t"),
            ("format", "json"),
            ("scan.bounded.mode", "latest-offset"),
        ];
        o.extend(options);
        let def = kafka_table(&bs, &cols(), &o);
        async move {
            let mut s = KafkaSource::open(&def, split, splits, 3).unwrap();
            ids(&read_to_end(&mut s).await)
        }
    };
    assert_eq!(read(vec![], 0, 1).await, (0..10).collect::<Vec<_>>());
    assert_eq!(
        read(vec![("scan.startup.mode", "earliest-offset")], 0, 1).await,
        (0..10).collect::<Vec<_>>()
    );
    assert!(read(vec![("scan.startup.mode", "latest-offset")], 0, 1)
        .await
        .is_empty());
    // Partition 0 holds 0, 4, 8 at offsets 0-2; partition 1 holds 1, 5, 9.
    assert_eq!(
        read(
            vec![
                ("scan.startup.mode", "specific-offsets"),
                (
                    "scan.startup.specific-offsets",
                    "partition:0,offset:2;partition:1,offset:1"
                ),
            ],
            0,
            1
        )
        .await,
        vec![2, 3, 5, 6, 7, 8, 9]
    );
    assert_eq!(
        read(
            vec![
                ("scan.startup.mode", "timestamp"),
                ("scan.startup.timestamp-millis", "6000"),
            ],
            0,
            1
        )
        .await,
        vec![5, 6, 7, 8, 9]
    );
    // Two subtasks read disjoint partitions that together are all of them.
    let a = read(vec![], 0, 2).await;
    let b = read(vec![], 1, 2).await;
    assert_eq!(a, vec![0, 2, 4, 6, 8]);
    assert_eq!(b, vec![1, 3, 5, 7, 9]);
}

#[tokio::test]
async fn group_offsets_start_where_the_group_is() {
    let cluster = cluster(&[("g", 1)]);
    let bs = cluster.bootstrap_servers();
    let values: Vec<String> = (0..5).map(|i| json(i, "x")).collect();
    produce(
        &bs,
        "g",
        &values
            .iter()
            .map(|v| (0, None, Some(v.as_str()), 0))
            .collect::<Vec<_>>(),
    );
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "readers")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset("g", 0, rdkafka::Offset::Offset(3))
        .unwrap();
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "g"),
            ("format", "json"),
            ("properties.group.id", "readers"),
            ("scan.startup.mode", "group-offsets"),
            ("scan.bounded.mode", "latest-offset"),
        ],
    );
    let mut s = KafkaSource::open(&def, 0, 1, 100).unwrap();
    assert_eq!(ids(&read_to_end(&mut s).await), vec![3, 4]);
}

#[tokio::test]
async fn restore_resumes_after_the_last_batch_returned() {
    let cluster = cluster(&[("r", 4)]);
    let bs = cluster.bootstrap_servers();
    ten_rows(&bs, "r");
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "r"),
            ("format", "json"),
            ("scan.bounded.mode", "latest-offset"),
        ],
    );
    let mut first = KafkaSource::open(&def, 0, 1, 2).unwrap();
    let mut seen = vec![];
    for _ in 0..2 {
        seen.push(first.next_batch().await.unwrap().unwrap());
    }
    let position = first.position();
    let mut second = KafkaSource::open(&def, 0, 1, 2).unwrap();
    second.restore(&position).unwrap();
    seen.extend(read_to_end(&mut second).await);
    assert_eq!(ids(&seen), (0..10).collect::<Vec<_>>(), "each row once");
}

#[tokio::test]
async fn formats_keys_and_values() {
    let cluster = cluster(&[("f", 1)]);
    let bs = cluster.bootstrap_servers();
    produce(
        &bs,
        "csv",
        &[
            (0, None, Some("1,one"), 0),
            (0, None, Some("2,\"t,wo\""), 0),
        ],
    );
    produce(&bs, "raw", &[(0, None, Some("any bytes {"), 0)]);
    produce(
        &bs,
        "keyed",
        &[
            (0, Some(r#"{"id": 7}"#), Some(r#"{"name": "seven"}"#), 0),
            (0, Some("8"), Some(r#"{"name": "eight"}"#), 0),
        ],
    );
    produce(
        &bs,
        "cdc",
        &[
            (
                0,
                None,
                Some(r#"{"before": null, "after": {"id": 1, "name": "a"}, "op": "c"}"#),
                0,
            ),
            (
                0,
                None,
                Some(
                    r#"{"before": {"id": 1, "name": "a"}, "after": {"id": 1, "name": "b"}, "op": "u"}"#,
                ),
                0,
            ),
            (0, None, None, 0),
        ],
    );
    let read = |topic: &'static str,
                columns: Vec<(&'static str, SqlType)>,
                options: Vec<(&'static str, &'static str)>| {
        let mut o = vec![("topic", topic), ("scan.bounded.mode", "latest-offset")];
        o.extend(options);
        let def = kafka_table(&bs, &columns, &o);
        async move {
            let mut s = KafkaSource::open(&def, 0, 1, 100).unwrap();
            let batches = read_to_end(&mut s).await;
            let rows: Vec<RecordBatch> = batches.iter().map(|b| b.rows.clone()).collect();
            let ops: Vec<i8> = batches
                .iter()
                .flat_map(|b| match &b.ops {
                    Some(o) => o.values().to_vec(),
                    None => vec![op::INSERT; b.num_rows()],
                })
                .collect();
            (concat_batches(&def.physical_schema(), &rows).unwrap(), ops)
        }
    };
    let (csv, _) = read("csv", cols(), vec![("format", "csv")]).await;
    assert_eq!(csv.column(1).as_string::<i32>().value(1), "t,wo");
    let (raw, _) = read(
        "raw",
        vec![("v", SqlType::Varchar(None))],
        vec![("format", "raw")],
    )
    .await;
    assert_eq!(raw.column(0).as_string::<i32>().value(0), "any bytes {");
    // The key holds id (JSON object, then a bare CSV value), the value the rest.
    let (keyed, _) = read(
        "keyed",
        cols(),
        vec![
            ("key.format", "json"),
            ("key.fields", "id"),
            ("value.format", "json"),
            ("value.fields-include", "EXCEPT_KEY"),
            ("json.ignore-parse-errors", "true"),
        ],
    )
    .await;
    assert_eq!(
        keyed.num_rows(),
        1,
        "the key '8' is no JSON object: skipped"
    );
    assert_eq!(keyed.column(0).as_primitive::<Int32Type>().value(0), 7);
    assert_eq!(keyed.column(1).as_string::<i32>().value(0), "seven");
    let (cdc, ops) = read("cdc", cols(), vec![("format", "debezium-json")]).await;
    assert_eq!(ops, vec![op::INSERT, op::UPDATE_BEFORE, op::UPDATE_AFTER]);
    assert_eq!(cdc.column(1).as_string::<i32>().value(2), "b");
}

#[tokio::test]
async fn bad_records_fail_with_their_offset_or_are_skipped() {
    let cluster = cluster(&[("b", 1)]);
    let bs = cluster.bootstrap_servers();
    let good = json(1, "ok");
    produce(
        &bs,
        "b",
        &[
            (0, None, Some(good.as_str()), 0),
            (0, None, Some("{not json"), 0),
            (0, None, Some(r#"{"id": "x"}"#), 0),
        ],
    );
    let def = |ignore: &'static str| {
        kafka_table(
            &bs,
            &cols(),
            &[
                ("topic", "b"),
                ("format", "json"),
                ("scan.bounded.mode", "latest-offset"),
                ("json.ignore-parse-errors", ignore),
            ],
        )
    };
    let mut failing = KafkaSource::open(&def("false"), 0, 1, 100).unwrap();
    let e = crate::sql::error::SqlError::from(failing.next_batch().await.unwrap_err());
    assert_eq!(e.code, "22P02");
    assert!(
        e.message
            .starts_with("bad json record in kafka topic 'b' partition 0 at offset 1:"),
        "{}",
        e.message
    );
    assert!(e
        .hint
        .as_deref()
        .unwrap_or_default()
        .contains("json.ignore-parse-errors"));
    let mut skipping = KafkaSource::open(&def("true"), 0, 1, 100).unwrap();
    assert_eq!(ids(&read_to_end(&mut skipping).await), vec![1]);
    assert_eq!(skipping.skipped_records(), 2);
}

#[tokio::test]
async fn new_topics_matching_the_pattern_are_discovered_while_running() {
    let cluster = cluster(&[("events-a", 1)]);
    let bs = cluster.bootstrap_servers();
    let one = json(1, "a");
    produce(&bs, "events-a", &[(0, None, Some(one.as_str()), 0)]);
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic-pattern", "events-.*"),
            ("format", "json"),
            ("scan.topic-partition-discovery.interval", "200 ms"),
        ],
    );
    let mut s = KafkaSource::open(&def, 0, 1, 100).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), s.next_batch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ids(&[first]), vec![1]);
    cluster.create_topic("events-b", 2, 1).unwrap();
    let two = json(2, "b");
    produce(&bs, "events-b", &[(1, None, Some(two.as_str()), 0)]);
    let next = tokio::time::timeout(Duration::from_secs(20), s.next_batch())
        .await
        .expect("the new topic's rows arrive")
        .unwrap()
        .unwrap();
    assert_eq!(ids(&[next]), vec![2]);
    assert_eq!(
        s.lane(),
        Some((2, 3)),
        "partition 1 of the new topic is the third lane"
    );
}

fn batch(ids: &[i32], names: &[&str]) -> RecordBatch {
    let def = table(&cols(), &[]);
    RecordBatch::try_new(
        def.physical_schema(),
        vec![
            Arc::new(arrow::array::Int32Array::from(ids.to_vec())),
            Arc::new(arrow::array::StringArray::from(names.to_vec())),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn at_least_once_sink_writes_rows_by_key() {
    let cluster = cluster(&[("out", 3)]);
    let bs = cluster.bootstrap_servers();
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "out"),
            ("key.format", "raw"),
            ("key.fields", "name"),
            ("value.format", "json"),
        ],
    );
    let mut sink = KafkaSink::open(&def, 0, "job1").unwrap();
    sink.write(batch(&[1, 2, 3], &["a", "b", "a"]))
        .await
        .unwrap();
    assert!(
        sink.precommit().await.unwrap().is_none(),
        "flushed, nothing held"
    );
    let mut got = consume_all(&bs, "out");
    got.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].1.as_deref(), Some("a"));
    assert_eq!(got[0].2.as_deref(), Some(r#"{"id":1,"name":"a"}"#));
    assert_eq!(got[0].0, got[2].0, "one key, one partition");
}

#[tokio::test]
async fn write_ahead_writes_a_committed_epoch_once_even_when_redone() {
    let cluster = cluster(&[("wa", 2)]);
    let bs = cluster.bootstrap_servers();
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "wa"),
            ("format", "json"),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.exactly-once.mode", "write-ahead"),
        ],
    );
    let mut sink = KafkaSink::open(&def, 1, "job1").unwrap();
    sink.write(batch(&[1, 2, 3], &["a", "b", "c"]))
        .await
        .unwrap();
    let Some(Precommit::Rows(kept)) = sink.precommit().await.unwrap() else {
        panic!("write-ahead keeps the rows");
    };
    assert_eq!(kept.subtask, 1);
    assert!(kept.transaction.is_none());
    let rows = |batches: Vec<ChangeBatch>| {
        vec![SinkRows {
            subtask: 1,
            rows: batches,
            transaction: None,
        }]
    };
    assert!(
        consume_all(&bs, "wa").is_empty(),
        "nothing before the commit"
    );
    let writer = Arc::new(WriteAhead::open(&def, "job1").unwrap());
    // A crash in the middle of the commit: only the first row made it.
    let first = rows(vec![ChangeBatch::new(batch(&[1], &["a"]))]);
    writer.clone().commit(7, first, false).await.unwrap();
    // The redo after the restart writes the rest, once, however often it runs.
    for _ in 0..2 {
        let all = rows(kept.rows.clone());
        writer.clone().commit(7, all, true).await.unwrap();
    }
    let got = consume_all(&bs, "wa");
    let mut values: Vec<String> = got.iter().filter_map(|m| m.2.clone()).collect();
    values.sort();
    assert_eq!(
        values,
        vec![
            r#"{"id":1,"name":"a"}"#,
            r#"{"id":2,"name":"b"}"#,
            r#"{"id":3,"name":"c"}"#
        ]
    );
    assert!(got.iter().all(|m| m
        .3
        .starts_with("weir.job=job1,weir.epoch=7,weir.subtask=1,weir.seq=")));
    // The next epoch is written in full.
    writer
        .clone()
        .commit(8, rows(vec![ChangeBatch::new(batch(&[4], &["d"]))]), true)
        .await
        .unwrap();
    assert_eq!(consume_all(&bs, "wa").len(), 4);
}

#[tokio::test]
async fn upsert_sink_writes_new_rows_and_tombstones() {
    let cluster = cluster(&[("up", 1)]);
    let bs = cluster.bootstrap_servers();
    let mut def = table(
        &cols(),
        &[
            ("connector", "upsert-kafka"),
            ("properties.bootstrap.servers", &bs),
            ("topic", "up"),
            ("key.format", "json"),
            ("value.format", "json"),
        ],
    );
    def.primary_key = vec!["id".into()];
    let mut sink = KafkaSink::open(&def, 0, "job1").unwrap();
    let mut changes = ChangeBatch::new(batch(&[1, 1, 1, 2, 2], &["a", "a", "b", "x", "x"]));
    changes.ops = Some(arrow::array::Int8Array::from(vec![
        op::INSERT,
        op::UPDATE_BEFORE,
        op::UPDATE_AFTER,
        op::INSERT,
        op::DELETE,
    ]));
    sink.write_changes(changes).await.unwrap();
    sink.precommit().await.unwrap();
    let got: Vec<(Option<String>, Option<String>)> = consume_all(&bs, "up")
        .into_iter()
        .map(|m| (m.1, m.2))
        .collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        got,
        vec![
            (s(r#"{"id":1}"#), s(r#"{"id":1,"name":"a"}"#)),
            (s(r#"{"id":1}"#), s(r#"{"id":1,"name":"b"}"#)),
            (s(r#"{"id":2}"#), s(r#"{"id":2,"name":"x"}"#)),
            (s(r#"{"id":2}"#), None),
        ]
    );
}

#[test]
fn options_are_checked_before_anything_runs() {
    let def = kafka_table(
        "127.0.0.1:1",
        &cols(),
        &[
            ("topic", "t"),
            ("format", "json"),
            ("sink.delivery-guarantee", "exactly-once"),
        ],
    );
    let e = KafkaSink::open(&def, 0, "job1").err().unwrap();
    assert!(
        e.message.contains("sink.transactional-id-prefix"),
        "{}",
        e.message
    );
    let def = kafka_table(
        "127.0.0.1:1",
        &cols(),
        &[("topic", "t"), ("format", "json"), ("key.fields", "id")],
    );
    let e = KafkaSource::open(&def, 0, 1, 10).err().unwrap();
    assert!(e.message.contains("go together"), "{}", e.message);
    let def = kafka_table(
        "127.0.0.1:1",
        &cols(),
        &[
            ("topic", "t"),
            ("format", "json"),
            ("scan.startup.mode", "specific-offsets"),
            ("scan.startup.specific-offsets", "partition:x"),
        ],
    );
    let e = KafkaSource::open(&def, 0, 1, 10).err().unwrap();
    assert!(e.message.contains("partition:0,offset:42"), "{}", e.message);
}

#[tokio::test]
async fn transactions_precommit_at_barriers_commit_with_their_epoch_and_are_recovered() {
    use super::transactions::{Transactions, EVENTS};
    use crate::connector::io::Transaction;
    let cluster = cluster(&[("tx", 1)]);
    let bs = cluster.bootstrap_servers();
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "tx"),
            ("format", "json"),
            ("sink.delivery-guarantee", "exactly-once"),
            ("sink.transactional-id-prefix", "tp"),
        ],
    );
    // What happened to this test's transactional ids since the last look.
    let seen = std::sync::Mutex::new(0);
    let events = || {
        let all: Vec<String> = EVENTS
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains(" tp-0-"))
            .cloned()
            .collect();
        let mut seen = seen.lock().unwrap();
        let new = all[*seen..].to_vec();
        *seen = all.len();
        new
    };
    let precommitted = |p: Option<Precommit>| match p {
        Some(Precommit::Rows(r)) => r,
        _ => panic!("an exactly-once sink leaves its rows to the coordinator"),
    };
    let mut sink = KafkaSink::open(&def, 0, "job1").unwrap();
    let committer = Arc::new(Transactions::open(&def, "job1").unwrap());
    // Epoch 1 is written in a transaction, pre-committed at its barrier; epoch 2 goes
    // on in the next producer while epoch 1 commits.
    sink.write(batch(&[1, 2], &["a", "b"])).await.unwrap();
    let e1 = precommitted(sink.precommit().await.unwrap());
    assert_eq!(e1.transaction.as_ref().unwrap().id, "tp-0-0");
    assert_eq!(e1.rows.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    sink.write(batch(&[3], &["c"])).await.unwrap();
    committer
        .clone()
        .commit(1, vec![e1.clone()], false)
        .await
        .unwrap();
    let e2 = precommitted(sink.precommit().await.unwrap());
    assert_eq!(e2.transaction.as_ref().unwrap().id, "tp-0-1");
    let e3 = precommitted(sink.precommit().await.unwrap());
    assert!(
        e3.transaction.is_none(),
        "an epoch without rows has no transaction"
    );
    assert_eq!(
        events(),
        [
            "init tp-0-0",
            "init tp-0-1",
            "init tp-0-2",
            "init tp-0-3",
            "begin tp-0-0",
            "precommit tp-0-0",
            "begin tp-0-1",
            "commit tp-0-0",
            "precommit tp-0-1",
        ]
    );

    // A crash: epoch 2 never committed. The restart redoes epoch 1's commit (its id is
    // initialized, its messages are found committed: nothing is written again), and
    // the restarted sink initializes its pool, which aborts epoch 2's transaction.
    drop(sink);
    let committer = Arc::new(Transactions::open(&def, "job1").unwrap());
    committer
        .clone()
        .commit(1, vec![e1.clone()], true)
        .await
        .unwrap();
    assert_eq!(events(), ["init tp-0-0"]);
    let mut sink = KafkaSink::open(&def, 0, "job1").unwrap();
    assert!(precommitted(sink.precommit().await.unwrap())
        .transaction
        .is_none());
    assert_eq!(
        events(),
        ["init tp-0-0", "init tp-0-1", "init tp-0-2", "init tp-0-3"]
    );

    // A committed epoch whose transaction's messages are not visible (the broker
    // aborted it before the commit came) is written again in a new transaction under
    // the same id and committed, once.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    let (_, end) = consumer
        .fetch_watermarks("tx", 0, Duration::from_secs(10))
        .unwrap();
    let lost = SinkRows {
        subtask: 0,
        rows: vec![ChangeBatch::new(batch(&[9], &["z"]))],
        transaction: Some(Transaction {
            id: "tp-0-2".into(),
            nonce: 42,
            offsets: vec![(0, end)],
        }),
    };
    committer
        .clone()
        .commit(5, vec![lost.clone()], true)
        .await
        .unwrap();
    assert_eq!(events(), ["init tp-0-2", "rewrite and commit tp-0-2"]);
    committer.clone().commit(5, vec![lost], true).await.unwrap();
    assert_eq!(events(), ["init tp-0-2"], "found committed the second time");
    let ids: Vec<String> = consume_all(&bs, "tx")
        .into_iter()
        .filter_map(|m| m.2)
        .collect();
    // (The mock cluster shows aborted messages too: epoch 2's row 3 is there.)
    for (id, times) in [(1, 1), (2, 1), (9, 1)] {
        let n = ids
            .iter()
            .filter(|v| v.starts_with(&format!(r#"{{"id":{id},"#)))
            .count();
        assert_eq!(n, times, "row {id} in {ids:?}");
    }
}

#[tokio::test]
async fn metadata_columns_come_from_the_message() {
    let cluster = cluster(&[("m", 2)]);
    let bs = cluster.bootstrap_servers();
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .create()
        .unwrap();
    let value = json(1, "a");
    let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
        key: "trace",
        value: Some("t-1"),
    });
    producer
        .send(
            BaseRecord::to("m")
                .partition(1)
                .key("k1")
                .payload(&value)
                .timestamp(1_700_000_000_123)
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    let mut def = kafka_table(
        &bs,
        &[
            ("id", SqlType::Int),
            ("k", SqlType::Varchar(None)),
            ("tt", SqlType::Varchar(None)),
            ("ts", SqlType::TimestampLtz(3)),
            ("h", SqlType::Varchar(None)),
            ("p", SqlType::BigInt),
        ],
        &[
            ("topic", "m"),
            ("format", "json"),
            ("scan.bounded.mode", "latest-offset"),
        ],
    );
    for (c, key) in [
        (1, "key"),
        (2, "timestamp-type"),
        (3, "timestamp"),
        (4, "headers"),
        (5, "partition"),
    ] {
        def.columns[c].metadata = Some(key.into());
    }
    let mut s = KafkaSource::open(&def, 0, 1, 10).unwrap();
    let rows = read_to_end(&mut s).await;
    let b = &rows[0].rows;
    assert_eq!(b.num_rows(), 1);
    assert_eq!(b.column(0).as_primitive::<Int32Type>().value(0), 1);
    assert_eq!(b.column(1).as_string::<i32>().value(0), "k1");
    assert_eq!(b.column(2).as_string::<i32>().value(0), "CreateTime");
    assert_eq!(
        b.column(3)
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>()
            .value(0),
        1_700_000_000_123
    );
    assert_eq!(
        b.column(4).as_string::<i32>().value(0),
        r#"{"trace":"t-1"}"#
    );
    assert_eq!(
        b.column(5)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0),
        1,
        "partition, cast to the column's BIGINT"
    );
    // Metadata columns are not part of the value (a sink does not write them), and
    // cannot be key fields.
    let mut with_partition = kafka_table(
        &bs,
        &[
            ("id", SqlType::Int),
            ("p", SqlType::Int),
            ("name", SqlType::Varchar(None)),
        ],
        &[("topic", "m"), ("format", "json")],
    );
    with_partition.columns[1].metadata = Some("partition".into());
    assert_eq!(
        super::Layout::of(&with_partition).unwrap().value_columns,
        vec![0, 2]
    );
    let out = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "m"),
            ("format", "json"),
            ("key.fields", "name"),
            ("key.format", "raw"),
        ],
    );
    let mut with_meta = out.clone();
    with_meta.columns[1].metadata = Some("topic".into());
    let e = super::Layout::of(&with_meta).unwrap_err();
    assert!(
        e.message.contains("METADATA column \"name\""),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn a_restore_keeps_where_quiet_partitions_started() {
    let cluster = cluster(&[("q", 2)]);
    let bs = cluster.bootstrap_servers();
    let old = [json(1, "old"), json(2, "old")];
    produce(
        &bs,
        "q",
        &[
            (0, None, Some(old[0].as_str()), 0),
            (1, None, Some(old[1].as_str()), 0),
        ],
    );
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "q"),
            ("format", "json"),
            ("scan.startup.mode", "latest-offset"),
        ],
    );
    let mut first = KafkaSource::open(&def, 0, 1, 10).unwrap();
    // A row arrives in partition 0 once the source started; partition 1 stays quiet.
    let bootstrap = bs.clone();
    let later = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(500));
        let v = json(3, "new");
        produce(&bootstrap, "q", &[(0, None, Some(v.as_str()), 0)]);
    });
    let batch = tokio::time::timeout(Duration::from_secs(20), first.next_batch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    later.await.unwrap();
    assert_eq!(ids(&[batch]), vec![3]);
    let position = first.position();
    // After the checkpoint partition 1 gets a row; the restored source reads it, and
    // not what partition 1 held before the first start.
    let v = json(4, "new");
    produce(&bs, "q", &[(1, None, Some(v.as_str()), 0)]);
    let mut second = KafkaSource::open(&def, 0, 1, 10).unwrap();
    second.restore(&position).unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(20), second.next_batch())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ids(&[batch]), vec![4]);
}

#[tokio::test]
async fn a_bounded_read_of_many_messages_reads_them_all() {
    let cluster = cluster(&[("many", 4)]);
    let bs = cluster.bootstrap_servers();
    let values: Vec<String> = (0..20_000).map(|i| json(i, "n")).collect();
    let messages: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| ((i % 4) as i32, None, Some(v.as_str()), 0))
        .collect();
    produce(&bs, "many", &messages);
    let def = kafka_table(
        &bs,
        &cols(),
        &[
            ("topic", "many"),
            ("format", "json"),
            ("scan.bounded.mode", "latest-offset"),
        ],
    );
    let mut s = KafkaSource::open(&def, 0, 1, 1000).unwrap();
    let rows: usize = read_to_end(&mut s).await.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 20_000);
}
