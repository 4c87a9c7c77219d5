//! Kafka sinks: every row a message, with the delivery guarantee the table asks for.
//!
//! - 'none': rows are handed to librdkafka and not waited for.
//! - 'at-least-once' (the default): at every barrier the sink waits until everything it
//!   sent was acknowledged; after a crash the epoch's rows are written again.
//! - 'exactly-once' with 'sink.exactly-once.mode' = 'write-ahead': the sink keeps an
//!   epoch's rows in its checkpoint and the job's coordinator writes them once the epoch
//!   committed ([`WriteAhead`]), each message with headers naming job, epoch, subtask and
//!   sequence number. After a crash the commit of the restored epoch is redone: the tail
//!   of each partition is read to find which of its messages were already written, and
//!   only the rest are. Partitions are chosen deterministically for this.
//! - 'exactly-once' with 'transactional' (Flink's default): see [`super::transactions`].
//!
//! `upsert-kafka` writes an updating query: the key is the primary key, the value the new
//! row, and a deletion is a tombstone (no value).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::UInt32Array;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::common::Result;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use weir_catalog::{op, TableDef};

use super::transactions::Transactional;
use super::{client_config, kafka_error, read_back, stamp_headers, topics, Layout};
use crate::connector::factory::{blocking, invalid, to_df};
use crate::connector::format::RecordEncoder;
use crate::connector::io::{EpochWriter, SinkRows, SinkWriter};
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::checkpoint::Precommit;
use crate::stream::message::{ChangeBatch, Epoch};

/// How long a flush may wait for the broker before the sink fails.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    None,
    AtLeastOnce,
    WriteAhead,
    Transactional,
}

impl Guarantee {
    pub fn of(def: &TableDef) -> SqlResult<Self> {
        let guarantee = def
            .options
            .get("sink.delivery-guarantee")
            .map(String::as_str);
        let mode = def
            .options
            .get("sink.exactly-once.mode")
            .map(String::as_str);
        Ok(match (guarantee, mode) {
            (Some("exactly-once"), None | Some("transactional")) => {
                if !def.options.contains_key("sink.transactional-id-prefix") {
                    return Err(invalid(format!(
                        "kafka table \"{}\" writes exactly-once with Kafka transactions and \
                         needs 'sink.transactional-id-prefix'",
                        def.name
                    ))
                    .with_hint(
                        "add 'sink.transactional-id-prefix' = '<unique name>', or set \
                         'sink.exactly-once.mode' = 'write-ahead' for brokers without \
                         transactions",
                    ));
                }
                Guarantee::Transactional
            }
            (Some("exactly-once"), Some("write-ahead")) => Guarantee::WriteAhead,
            (Some("exactly-once"), Some(other)) => {
                return Err(invalid(format!(
                    "bad value '{other}' for 'sink.exactly-once.mode'; expected \
                     'transactional' or 'write-ahead'"
                )))
            }
            (_, Some(_)) => {
                return Err(invalid(
                    "'sink.exactly-once.mode' needs 'sink.delivery-guarantee' = 'exactly-once'",
                ))
            }
            (Some("none"), None) => Guarantee::None,
            (None | Some("at-least-once"), None) => Guarantee::AtLeastOnce,
            (Some(other), None) => {
                return Err(invalid(format!(
                    "bad value '{other}' for 'sink.delivery-guarantee'; expected 'none', \
                     'at-least-once' or 'exactly-once'"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Partitioner {
    /// By the key's murmur2 hash, as Kafka's default partitioner; rows without a key
    /// spread round-robin.
    Default,
    /// Sink subtask i writes to partition i % partitions.
    Fixed,
    RoundRobin,
}

/// One message: key and value bytes (no value: a tombstone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// Turns rows into messages.
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    value: RecordEncoder,
    value_columns: Vec<usize>,
    key: Option<(RecordEncoder, Vec<usize>)>,
    /// upsert-kafka: deletions become tombstones and update-befores are dropped.
    upsert: bool,
}

impl Encoder {
    fn of(def: &TableDef) -> SqlResult<Self> {
        let upsert = def.connector() == Some("upsert-kafka");
        let layout = Layout::of(def)?;
        if upsert && layout.key_format.is_none() {
            return Err(invalid(format!(
                "upsert-kafka table \"{}\" needs 'key.format' (its key is the primary key)",
                def.name
            )));
        }
        Ok(Self {
            value: RecordEncoder::new(def, layout.value_format)?,
            value_columns: layout.value_columns,
            key: match layout.key_format {
                Some(f) => Some((RecordEncoder::new(def, f)?, layout.key_columns)),
                None => None,
            },
            upsert,
        })
    }

    pub(super) fn records(&self, batch: &ChangeBatch) -> SqlResult<Vec<Record>> {
        let (rows, ops) = match (&batch.ops, self.upsert) {
            // -U rows are followed by their +U: only the new row is written.
            (Some(ops), true) => {
                let keep: Vec<u32> = (0..ops.len())
                    .filter(|&i| ops.value(i) != op::UPDATE_BEFORE)
                    .map(|i| i as u32)
                    .collect();
                let take = UInt32Array::from(keep.clone());
                let rows = arrow::compute::take_record_batch(&batch.rows, &take)?;
                let deletes: Vec<bool> = keep
                    .iter()
                    .map(|&i| ops.value(i as usize) == op::DELETE)
                    .collect();
                (rows, Some(deletes))
            }
            _ => (batch.rows.clone(), None),
        };
        let values = self.value.records(&rows.project(&self.value_columns)?)?;
        let keys: Vec<Option<Vec<u8>>> = match &self.key {
            Some((encoder, columns)) => encoder
                .records(&rows.project(columns)?)?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; values.len()],
        };
        Ok(values
            .into_iter()
            .zip(keys)
            .enumerate()
            .map(|(i, (value, key))| Record {
                key,
                value: (!ops.as_ref().is_some_and(|d| d[i])).then_some(value),
            })
            .collect())
    }
}

/// Keeps the first failed delivery, reported at the next flush, and the first offset
/// written to each partition since [`Deliveries::take_first_offsets`].
#[derive(Default)]
pub(super) struct Deliveries {
    failed: Mutex<Option<String>>,
    first_offsets: Mutex<std::collections::BTreeMap<i32, i64>>,
}

impl Deliveries {
    pub(super) fn take_first_offsets(&self) -> Vec<(i32, i64)> {
        let mut offsets = self.first_offsets.lock().expect("not poisoned");
        std::mem::take(&mut *offsets).into_iter().collect()
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Err((e, _)) => {
                let mut failed = self.failed.lock().expect("not poisoned");
                failed.get_or_insert_with(|| e.to_string());
            }
            Ok(m) => {
                let mut offsets = self.first_offsets.lock().expect("not poisoned");
                let first = offsets.entry(m.partition()).or_insert(m.offset());
                *first = (*first).min(m.offset());
            }
        }
    }
}

pub(super) type KafkaProducer = ThreadedProducer<Deliveries>;

/// A producer for table `def`, with `extra` settings over its properties.
pub(super) fn producer(def: &TableDef, extra: &[(&str, &str)]) -> SqlResult<KafkaProducer> {
    let mut config = client_config(def, &[("partitioner", "murmur2_random")]);
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config
        .create_with_context(Deliveries::default())
        .map_err(|e| kafka_error(def, "create a producer", e))
}

/// Sends one message, waiting while librdkafka's queue is full.
pub(super) fn send(
    producer: &KafkaProducer,
    topic: &str,
    record: &Record,
    partition: Option<i32>,
    headers: Option<OwnedHeaders>,
) -> std::result::Result<(), rdkafka::error::KafkaError> {
    loop {
        let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = &record.key {
            r = r.key(k.as_slice());
        }
        if let Some(v) = &record.value {
            r = r.payload(v.as_slice());
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        if let Some(h) = &headers {
            r = r.headers(h.clone());
        }
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => producer.poll(Duration::from_millis(10)),
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until everything sent was acknowledged, and reports a failed delivery.
pub(super) fn flush(def: &TableDef, producer: &KafkaProducer) -> SqlResult<()> {
    producer
        .flush(FLUSH_TIMEOUT)
        .map_err(|e| kafka_error(def, "flush messages", e))?;
    if let Some(e) = producer
        .context()
        .failed
        .lock()
        .expect("not poisoned")
        .take()
    {
        return Err(SqlError::new(
            sqlstate::IO_ERROR,
            format!(
                "kafka table \"{}\": a message was not delivered: {e}",
                def.name
            ),
        ));
    }
    Ok(())
}

/// librdkafka's default 'transaction.timeout.ms'.
const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// What can be checked of a Kafka sink table before a job writing to it starts.
pub fn check_sink(def: &TableDef, checkpoint_interval: Duration) -> SqlResult<()> {
    let guarantee = Guarantee::of(def)?;
    sink_topic(def)?;
    Encoder::of(def)?;
    if guarantee == Guarantee::Transactional {
        let key = "properties.transaction.timeout.ms";
        let timeout = match def.options.get(key) {
            None => DEFAULT_TRANSACTION_TIMEOUT_MS,
            Some(v) => v.trim().parse().map_err(|_| {
                invalid(format!(
                    "bad value '{v}' for '{key}'; expected milliseconds"
                ))
            })?,
        };
        let interval = checkpoint_interval.as_millis() as u64;
        // A transaction is open for an epoch and then until the epoch commits.
        if timeout < 2 * interval {
            return Err(invalid(format!(
                "kafka table \"{}\": '{key}' ({timeout} ms) must be at least twice the \
                 checkpoint interval ({interval} ms), or the broker aborts transactions \
                 before their epoch commits",
                def.name
            ))
            .with_hint(format!(
                "raise '{key}' or lower 'execution.checkpointing.interval'"
            )));
        }
    }
    Ok(())
}

/// The one topic a sink writes to.
fn sink_topic(def: &TableDef) -> SqlResult<String> {
    match topics(def).as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(invalid(format!(
            "kafka table \"{}\" is written to, so 'topic' must name exactly one topic",
            def.name
        ))),
    }
}

fn partitioner(def: &TableDef) -> Partitioner {
    match def.options.get("sink.partitioner").map(String::as_str) {
        Some("fixed") => Partitioner::Fixed,
        Some("round-robin") => Partitioner::RoundRobin,
        _ => Partitioner::Default,
    }
}

/// The number of partitions of `topic`.
fn partition_count(def: &TableDef, producer: &KafkaProducer, topic: &str) -> SqlResult<i32> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), LOOKUP_TIMEOUT)
        .map_err(|e| kafka_error(def, "read topic metadata", e))?;
    let n = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32);
    if n == 0 {
        return Err(SqlError::new(
            sqlstate::UNDEFINED_OBJECT,
            format!(
                "kafka table \"{}\": topic '{topic}' does not exist (or has no partitions)",
                def.name
            ),
        )
        .with_hint("create the topic first"));
    }
    Ok(n)
}

/// Where a sink's messages go: its topic, how rows become messages and which
/// partition each takes.
#[derive(Clone)]
pub(super) struct Placement {
    pub(super) topic: String,
    pub(super) encoder: Encoder,
    partitioner: Partitioner,
    partitions: i32,
}

impl Placement {
    pub(super) fn of(def: &TableDef) -> SqlResult<(Self, KafkaProducer)> {
        let topic = sink_topic(def)?;
        let encoder = Encoder::of(def)?;
        let producer = producer(def, &[])?;
        let partitions = partition_count(def, &producer, &topic)?;
        Ok((
            Self {
                topic,
                encoder,
                partitioner: partitioner(def),
                partitions,
            },
            producer,
        ))
    }

    /// The partition of the `seq`-th message of sink subtask `subtask` (`None`:
    /// librdkafka's murmur2 hash of the key); the same every time it is asked.
    pub(super) fn partition(&self, record: &Record, subtask: usize, seq: u64) -> Option<i32> {
        let n = self.partitions as u64;
        match self.partitioner {
            Partitioner::Fixed => Some((subtask as u64 % n) as i32),
            Partitioner::Default if record.key.is_some() => None,
            Partitioner::Default | Partitioner::RoundRobin => {
                Some(((subtask as u64 + seq) % n) as i32)
            }
        }
    }
}

/// What a sink subtask keeps: its producer (when it writes itself) or its transactions.
struct SinkState {
    def: Arc<TableDef>,
    subtask: usize,
    placement: Placement,
    producer: Option<Arc<KafkaProducer>>,
    transactional: Option<Transactional>,
    sent: u64,
}

pub struct KafkaSink {
    guarantee: Guarantee,
    state: Option<SinkState>,
    /// The epoch's rows, kept for the checkpoint (exactly-once modes).
    pending: Vec<ChangeBatch>,
}

impl KafkaSink {
    pub fn open(def: &TableDef, subtask: usize, job: &str) -> SqlResult<Self> {
        let guarantee = Guarantee::of(def)?;
        let (placement, producer) = Placement::of(def)?;
        let (producer, transactional) = match guarantee {
            Guarantee::None | Guarantee::AtLeastOnce => (Some(Arc::new(producer)), None),
            Guarantee::WriteAhead => (None, None),
            Guarantee::Transactional => (
                None,
                Some(Transactional::new(def, subtask, job, placement.clone())),
            ),
        };
        Ok(Self {
            guarantee,
            state: Some(SinkState {
                def: Arc::new(def.clone()),
                subtask,
                placement,
                producer,
                transactional,
                sent: 0,
            }),
            pending: vec![],
        })
    }
}

impl SinkState {
    fn send_all(&mut self, batch: &ChangeBatch) -> SqlResult<()> {
        if let Some(t) = &mut self.transactional {
            return t.write(batch);
        }
        let producer = self
            .producer
            .as_ref()
            .expect("a writing sink has a producer");
        for record in self.placement.encoder.records(batch)? {
            let partition = self.placement.partition(&record, self.subtask, self.sent);
            self.sent += 1;
            send(producer, &self.placement.topic, &record, partition, None)
                .map_err(|e| kafka_error(&self.def, "send a message", e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl SinkWriter for KafkaSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.write_changes(ChangeBatch::new(batch)).await
    }

    async fn write_changes(&mut self, batch: ChangeBatch) -> Result<()> {
        match self.guarantee {
            Guarantee::WriteAhead => {
                self.pending.push(batch);
                Ok(())
            }
            Guarantee::Transactional => {
                self.pending.push(batch.clone());
                blocking(&mut self.state, move |s| s.send_all(&batch))
                    .await?
                    .map_err(to_df)
            }
            _ => self
                .state
                .as_mut()
                .expect("open")
                .send_all(&batch)
                .map_err(to_df),
        }
    }

    async fn flush(&mut self) -> Result<()> {
        let state = self.state.as_ref().expect("open");
        if let Some(producer) = state.producer.clone() {
            let def = state.def.clone();
            tokio::task::spawn_blocking(move || flush(&def, &producer))
                .await
                .map_err(|e| to_df(SqlError::internal(format!("kafka flush failed: {e}"))))?
                .map_err(to_df)?;
        }
        Ok(())
    }

    async fn precommit(&mut self) -> Result<Option<Precommit>> {
        match self.guarantee {
            Guarantee::None => Ok(None),
            Guarantee::AtLeastOnce => {
                self.flush().await?;
                Ok(None)
            }
            Guarantee::WriteAhead | Guarantee::Transactional => {
                let transaction = blocking(&mut self.state, |s| match &mut s.transactional {
                    Some(t) => t.precommit(),
                    None => Ok(None),
                })
                .await?
                .map_err(to_df)?;
                Ok(Some(Precommit::Rows(SinkRows {
                    subtask: self.state.as_ref().expect("open").subtask as u32,
                    rows: std::mem::take(&mut self.pending),
                    transaction,
                })))
            }
        }
    }
}

const JOB: &str = "weir.job";
const EPOCH: &str = "weir.epoch";
const SUBTASK: &str = "weir.subtask";
const SEQ: &str = "weir.seq";

/// Writes a committed epoch's rows for a 'write-ahead' exactly-once sink: once, even
/// when the commit is redone after a crash.
pub struct WriteAhead {
    def: Arc<TableDef>,
    job: String,
    placement: Placement,
    producer: Arc<KafkaProducer>,
}

impl WriteAhead {
    pub fn open(def: &TableDef, job: &str) -> SqlResult<Self> {
        Ok(Self {
            def: Arc::new(def.clone()),
            job: job.to_string(),
            placement: Placement::of(def)?.0,
            // Idempotence keeps librdkafka's own retries from writing a message twice.
            producer: Arc::new(producer(def, &[("enable.idempotence", "true")])?),
        })
    }

    /// The (subtask, sequence) numbers of epoch `epoch` already in the topic: read back
    /// from the end of each partition until a message of an earlier epoch of this job.
    fn written(&self, epoch: Epoch, partitions: i32) -> SqlResult<HashSet<(u32, u64)>> {
        let consumer: BaseConsumer = client_config(&self.def, &[("group.id", "weir-read-back")])
            .create()
            .map_err(|e| kafka_error(&self.def, "create a consumer", e))?;
        let topic = &self.placement.topic;
        let mut found = HashSet::new();
        for partition in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
                .map_err(|e| kafka_error(&self.def, "read partition offsets", e))?;
            let mut end = high;
            let mut chunk = 1024;
            while end > low {
                let start = (end - chunk).max(low);
                // Offsets start..end: this job's messages of `epoch`, and whether one of
                // an earlier epoch shows that the epoch's messages all came after it.
                let mut older = false;
                read_back(&self.def, topic, partition, start, false, |m| {
                    match self.stamp(m) {
                        Some((e, subtask, seq)) if e == epoch => {
                            found.insert((subtask, seq));
                        }
                        Some((e, ..)) if e < epoch => older = true,
                        _ => {}
                    }
                    m.offset() + 1 >= end
                })?;
                if older {
                    break;
                }
                end = start;
                chunk *= 2;
            }
        }
        Ok(found)
    }

    /// The headers that name a message's place in the job's output.
    fn headers(&self, epoch: Epoch, subtask: u32, seq: u64) -> OwnedHeaders {
        stamp_headers([
            (JOB, self.job.clone()),
            (EPOCH, epoch.to_string()),
            (SUBTASK, subtask.to_string()),
            (SEQ, seq.to_string()),
        ])
    }

    /// (epoch, subtask, sequence) of a message this job wrote.
    fn stamp(&self, m: &impl Message) -> Option<(Epoch, u32, u64)> {
        let headers = m.headers()?;
        let get = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
        };
        if get(JOB)? != self.job {
            return None;
        }
        Some((
            get(EPOCH)?.parse().ok()?,
            get(SUBTASK)?.parse().ok()?,
            get(SEQ)?.parse().ok()?,
        ))
    }

    fn write(&self, epoch: Epoch, rows: &[SinkRows], redo: bool) -> SqlResult<()> {
        if rows
            .iter()
            .all(|r| r.rows.iter().all(|b| b.num_rows() == 0))
        {
            return Ok(());
        }
        let written = if redo {
            self.written(epoch, self.placement.partitions)?
        } else {
            HashSet::new()
        };
        let total: usize = rows
            .iter()
            .flat_map(|r| r.rows.iter().map(|b| b.num_rows()))
            .sum();
        let mut done = 0;
        for SinkRows { subtask, rows, .. } in rows {
            let mut seq = 0u64;
            for batch in rows {
                for record in self.placement.encoder.records(batch)? {
                    if !written.contains(&(*subtask, seq)) {
                        let partition = self.placement.partition(&record, *subtask as usize, seq);
                        let headers = self.headers(epoch, *subtask, seq);
                        let topic = &self.placement.topic;
                        send(&self.producer, topic, &record, partition, Some(headers))
                            .map_err(|e| kafka_error(&self.def, "send a message", e))?;
                    }
                    seq += 1;
                    done += 1;
                    use crate::stream::failpoint::{armed, at, hit};
                    if done == total / 2 && armed(at::KAFKA_COMMIT_MIDWAY) {
                        // For recovery tests: a crash with half the epoch written.
                        flush(&self.def, &self.producer)?;
                        hit(at::KAFKA_COMMIT_MIDWAY);
                    }
                }
            }
        }
        flush(&self.def, &self.producer)
    }
}

#[async_trait]
impl EpochWriter for WriteAhead {
    async fn commit(self: Arc<Self>, epoch: Epoch, rows: Vec<SinkRows>, redo: bool) -> Result<()> {
        tokio::task::spawn_blocking(move || self.write(epoch, &rows, redo))
            .await
            .map_err(|e| to_df(SqlError::internal(format!("kafka commit failed: {e}"))))?
            .map_err(to_df)
    }
}
