//! The Kafka source: one reader per source subtask, over the partitions assigned to it.
//!
//! Partitions are assigned by hand (no consumer-group rebalancing): every partition of the
//! table's topics, in (topic, partition) order, goes to subtask `index % subtasks`.
//! Partitions that appear later are found every 'scan.topic-partition-discovery.interval'
//! and read from their start. The reader's position is the next offset of each of its
//! partitions; a checkpoint records it and a restore seeks there, so no record is read
//! twice or skipped. With 'properties.group.id' set, the positions are also committed to
//! the group, for monitoring only.
//!
//! Each batch holds records of one partition, so the source keeps a watermark per
//! partition (see [`crate::stream::source::SourceRows`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::ArrayRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::common::Result;
use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use weir_catalog::TableDef;

use super::metadata::{self, Metadata};
use super::{client_config, kafka_error, topics, Layout};
use crate::connector::factory::{invalid, opt_bool, opt_duration, opt_u64, to_df};
use crate::connector::format::{Format, RecordDecoder};
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::message::ChangeBatch;
use crate::stream::source::LaneOf;

/// Flink's default for 'scan.topic-partition-discovery.interval'.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(300);
/// How long a metadata or offset lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Startup {
    Earliest,
    Latest,
    GroupOffsets,
    Timestamp(i64),
    /// Offsets by partition; partitions not named start at the earliest offset.
    Specific(HashMap<i32, i64>),
}

impl Startup {
    fn of(def: &TableDef) -> SqlResult<Self> {
        Ok(
            match def.options.get("scan.startup.mode").map(String::as_str) {
                None | Some("group-offsets") if def.options.contains_key("properties.group.id") => {
                    Startup::GroupOffsets
                }
                Some("group-offsets") => {
                    return Err(invalid(format!(
                        "kafka table \"{}\" starts from 'group-offsets' and needs \
                         'properties.group.id'",
                        def.name
                    )))
                }
                None | Some("earliest-offset") => Startup::Earliest,
                Some("latest-offset") => Startup::Latest,
                Some("timestamp") => Startup::Timestamp(
                    opt_u64(def, "scan.startup.timestamp-millis")?.ok_or_else(|| {
                        invalid(
                            "'scan.startup.mode' = 'timestamp' needs \
                             'scan.startup.timestamp-millis'",
                        )
                    })? as i64,
                ),
                Some("specific-offsets") => {
                    let text = def
                        .options
                        .get("scan.startup.specific-offsets")
                        .ok_or_else(|| {
                            invalid(
                                "'scan.startup.mode' = 'specific-offsets' needs \
                                 'scan.startup.specific-offsets', e.g. \
                                 'partition:0,offset:42;partition:1,offset:300'",
                            )
                        })?;
                    Startup::Specific(specific_offsets(text)?)
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "bad value '{other}' for 'scan.startup.mode'"
                    )))
                }
            },
        )
    }

    fn offset(&self, partition: i32) -> Offset {
        match self {
            Startup::Earliest | Startup::Timestamp(_) => Offset::Beginning,
            Startup::Latest => Offset::End,
            Startup::GroupOffsets => Offset::Stored,
            Startup::Specific(offsets) => offsets
                .get(&partition)
                .map_or(Offset::Beginning, |o| Offset::Offset(*o)),
        }
    }
}

/// Flink's 'partition:0,offset:42;partition:1,offset:300'.
fn specific_offsets(text: &str) -> SqlResult<HashMap<i32, i64>> {
    let bad = || {
        invalid(format!(
            "bad value '{text}' for 'scan.startup.specific-offsets'; expected \
             'partition:0,offset:42;partition:1,offset:300'"
        ))
    };
    let mut out = HashMap::new();
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (p, o) = entry.split_once(',').ok_or_else(bad)?;
        let p = p.trim().strip_prefix("partition:").ok_or_else(bad)?;
        let o = o.trim().strip_prefix("offset:").ok_or_else(bad)?;
        out.insert(
            p.trim().parse().map_err(|_| bad())?,
            o.trim().parse().map_err(|_| bad())?,
        );
    }
    Ok(out)
}

/// Whether the source ends: 'scan.bounded.mode' = 'latest-offset'.
pub fn is_bounded(def: &TableDef) -> SqlResult<bool> {
    match def.options.get("scan.bounded.mode").map(String::as_str) {
        None | Some("unbounded") => Ok(false),
        Some("latest-offset") => Ok(true),
        Some(other) => Err(invalid(format!(
            "bad value '{other}' for 'scan.bounded.mode'; Weir reads 'unbounded' or \
             'latest-offset'"
        ))),
    }
}

/// Which topics the table reads.
#[derive(Debug, Clone)]
enum Topics {
    Named(Vec<String>),
    Pattern(regex::Regex),
}

impl Topics {
    fn of(def: &TableDef) -> SqlResult<Self> {
        match def.options.get("topic-pattern") {
            Some(p) => Ok(Topics::Pattern(
                regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    invalid(format!("bad regular expression in 'topic-pattern': {e}"))
                })?,
            )),
            None => Ok(Topics::Named(topics(def))),
        }
    }
}

/// A partition this reader reads, and where it is.
#[derive(Debug, Clone)]
struct Partition {
    /// Shared with the metadata of every record read from it.
    topic: Arc<str>,
    partition: i32,
    /// The offset after the last record returned; `None` until a record was returned
    /// (then the startup mode decides where reading starts).
    next: Option<i64>,
    /// With 'scan.bounded.mode' = 'latest-offset': where reading starts and the end
    /// offset when the source started; the partition is done once `next` reaches it.
    bounds: Option<(i64, i64)>,
    /// Startup mode 'timestamp' read from the partition's start: records before this
    /// time are skipped until the first one at or after it.
    from_time: Option<i64>,
}

impl Partition {
    fn done(&self) -> bool {
        self.bounds
            .is_some_and(|(start, end)| self.next.unwrap_or(start) >= end)
    }
}

/// Where a partition is, as a checkpoint records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Place {
    /// The next offset to read; `None`: from the partition's beginning.
    next: Option<i64>,
    /// Startup mode 'timestamp' still skipping records before this time.
    from_time: Option<i64>,
}

/// The position of one reader of all the partitions that the readers with `positions`
/// had, for a source restored at another parallelism: each split then starts the
/// partitions it owns at their places. Per partition the furthest place wins: its next
/// offset only grows, and a reader keeps the place it restored for partitions it does
/// not read, so an older copy may sit in another reader's position.
pub fn merge_positions(positions: &[&[u8]]) -> SqlResult<Vec<u8>> {
    let mut merged: BTreeMap<(String, i32), Place> = BTreeMap::new();
    for position in positions {
        let places: Vec<(String, i32, Place)> = serde_json::from_slice(position)
            .map_err(|e| SqlError::internal(format!("bad kafka position: {e}")))?;
        for (topic, partition, place) in places {
            merged
                .entry((topic, partition))
                .and_modify(|kept| {
                    if place.next > kept.next {
                        *kept = place;
                    }
                })
                .or_insert(place);
        }
    }
    let places: Vec<(String, i32, Place)> = merged
        .into_iter()
        .map(|((topic, partition), place)| (topic, partition, place))
        .collect();
    Ok(serde_json::to_vec(&places).expect("positions serialize"))
}

/// Records taken from the consumer, decoded but not yet returned.
struct Pending {
    lane: u32,
    batch: ChangeBatch,
    next: i64,
}

/// What decodes one message into a row: value, key, metadata and their columns.
struct Decoders {
    value: RecordDecoder,
    value_columns: Vec<usize>,
    key: Option<(RecordDecoder, Vec<usize>)>,
    metadata: Vec<(usize, metadata::Field)>,
    wants_headers: bool,
    schema: arrow::datatypes::SchemaRef,
}

pub struct KafkaSource {
    def: Arc<TableDef>,
    split: usize,
    splits: usize,
    batch_size: usize,
    topics: Topics,
    startup: Startup,
    discovery: Duration,
    /// 'scan.bounded.mode' = 'latest-offset': the source ends at the offsets its
    /// partitions had when it started.
    bounded: bool,
    /// An `upsert-kafka` table's changelog: tombstones are rows too.
    upsert: bool,
    ignore_errors: bool,
    commit_to_group: bool,
    decoders: Decoders,
    consumer: Option<Arc<StreamConsumer>>,
    /// The partitions assigned, in the order they were found: a partition's index is
    /// its watermark lane.
    partitions: Vec<Partition>,
    restored: HashMap<(String, i32), Place>,
    /// Partitions to start by skipping records older than the startup timestamp.
    from_time: Vec<(String, i32)>,
    next_discovery: Instant,
    pending: VecDeque<Pending>,
    last_lane: LaneOf,
    skipped: u64,
}

impl KafkaSource {
    pub fn open(def: &TableDef, split: usize, splits: usize, batch_size: usize) -> SqlResult<Self> {
        let layout = Layout::of(def)?;
        let value_schema = Layout::schema_of(def, &layout.value_columns);
        let key = match layout.key_format {
            Some(f) => Some((
                RecordDecoder::new(def, f, Layout::schema_of(def, &layout.key_columns))?,
                layout.key_columns.clone(),
            )),
            None => None,
        };
        let ignore_errors = opt_bool(def, layout.value_format.ignore_errors_option())?
            || layout
                .key_format
                .is_some_and(|f| opt_bool(def, f.ignore_errors_option()).unwrap_or(false));
        Ok(Self {
            def: Arc::new(def.clone()),
            split,
            splits,
            batch_size,
            topics: Topics::of(def)?,
            startup: Startup::of(def)?,
            discovery: opt_duration(def, "scan.topic-partition-discovery.interval")?
                .unwrap_or(DISCOVERY_INTERVAL),
            bounded: is_bounded(def)?,
            upsert: def.connector() == Some("upsert-kafka"),
            ignore_errors,
            commit_to_group: def.options.contains_key("properties.group.id"),
            decoders: Decoders {
                value: RecordDecoder::new(def, layout.value_format, value_schema)?,
                value_columns: layout.value_columns,
                key,
                wants_headers: layout
                    .metadata
                    .iter()
                    .any(|(_, f)| *f == metadata::Field::Headers),
                metadata: layout.metadata,
                schema: def.physical_schema(),
            },
            consumer: None,
            partitions: vec![],
            restored: HashMap::new(),
            from_time: vec![],
            next_discovery: Instant::now(),
            pending: VecDeque::new(),
            last_lane: None,
            skipped: 0,
        })
    }

    fn consumer(&mut self) -> SqlResult<Arc<StreamConsumer>> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let consumer: StreamConsumer = client_config(
            &self.def,
            &[
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("enable.partition.eof", "false"),
                ("auto.offset.reset", "earliest"),
                // librdkafka pauses a partition's fetching for this long whenever its
                // prefetch queue is full (default 1 s): a consumer that empties the queue
                // in milliseconds then sits idle. Measured: 1 M messages from the mock
                // cluster in 6.6 s with the default, 1.0 s with 10 ms.
                ("fetch.queue.backoff.ms", "10"),
                // librdkafka wants a group for any consumer; offsets are Weir's own.
                ("group.id", "weir"),
            ],
        )
        .create()
        .map_err(|e| kafka_error(&self.def, "create a consumer", e))?;
        let consumer = Arc::new(consumer);
        self.consumer = Some(consumer.clone());
        Ok(consumer)
    }

    /// The partitions of the table's topics this split owns and does not read yet, with
    /// the offsets to start them at.
    async fn discover(&mut self) -> SqlResult<()> {
        let consumer = self.consumer()?;
        let topics = self.topics.clone();
        let def = self.def.clone();
        let all = tokio::task::spawn_blocking(move || -> SqlResult<Vec<(String, i32)>> {
            let metadata = consumer
                .fetch_metadata(None, LOOKUP_TIMEOUT)
                .map_err(|e| kafka_error(&def, "read topic metadata", e))?;
            let mut all = vec![];
            for t in metadata.topics() {
                let wanted = match &topics {
                    Topics::Named(names) => names.iter().any(|n| n == t.name()),
                    Topics::Pattern(p) => p.is_match(t.name()),
                };
                if wanted && t.error().is_none() {
                    all.extend(
                        t.partitions()
                            .iter()
                            .map(|p| (t.name().to_string(), p.id())),
                    );
                }
            }
            all.sort();
            Ok(all)
        })
        .await
        .map_err(|e| SqlError::internal(format!("kafka metadata lookup failed: {e}")))??;
        let new: Vec<(String, i32)> = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.splits == self.split)
            .map(|(_, p)| p)
            .filter(|(t, p)| {
                !self
                    .partitions
                    .iter()
                    .any(|q| *q.topic == **t && q.partition == *p)
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        // Where each new partition starts: its restored place, else the startup mode on
        // the first discovery, else (a partition added while running) its start.
        let first = self.partitions.is_empty() && self.restored.is_empty();
        let mut tpl = TopicPartitionList::new();
        let mut from_time = vec![None; new.len()];
        for (i, (t, p)) in new.iter().enumerate() {
            let offset = match self.restored.get(&(t.clone(), *p)) {
                Some(place) => {
                    from_time[i] = place.from_time;
                    place.next.map_or(Offset::Beginning, Offset::Offset)
                }
                None if first => self.startup.offset(*p),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(t, *p, offset)
                .map_err(|e| kafka_error(&self.def, "assign partitions", e))?;
        }
        if let (true, Startup::Timestamp(ts)) = (first, self.startup.clone()) {
            tpl = self.offsets_for_time(&new, ts).await?;
            for (i, (t, p)) in new.iter().enumerate() {
                if self.from_time.contains(&(t.clone(), *p)) {
                    from_time[i] = Some(ts);
                }
            }
        }
        let (tpl, ends) = self.resolve(&tpl).await?;
        self.consumer()?
            .incremental_assign(&tpl)
            .map_err(|e| kafka_error(&self.def, "assign partitions", e))?;
        for (i, e) in tpl.elements().iter().enumerate() {
            let next = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            self.partitions.push(Partition {
                topic: e.topic().into(),
                partition: e.partition(),
                next,
                bounds: ends[i],
                from_time: from_time[i],
            });
        }
        Ok(())
    }

    /// `tpl` with each partition's start made concrete, so that a checkpoint taken before
    /// a partition returned a record still names where it started: the end offset for
    /// 'latest-offset', the group's offset for 'group-offsets' (the start when it has
    /// none); the start of a partition stays "the beginning". With a bounded read, also
    /// each partition's (start, end) offsets.
    #[allow(clippy::type_complexity)]
    async fn resolve(
        &mut self,
        tpl: &TopicPartitionList,
    ) -> SqlResult<(TopicPartitionList, Vec<Option<(i64, i64)>>)> {
        let consumer = self.consumer()?;
        let def = self.def.clone();
        let bounded = self.bounded;
        let wanted: Vec<(String, i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let committed = if wanted.iter().any(|w| w.2 == Offset::Stored) {
                let mut query = TopicPartitionList::new();
                for (t, p, _) in &wanted {
                    query.add_partition(t, *p);
                }
                Some(
                    consumer
                        .committed_offsets(query, LOOKUP_TIMEOUT)
                        .map_err(|e| kafka_error(&def, "read the group's offsets", e))?,
                )
            } else {
                None
            };
            let mut resolved = TopicPartitionList::new();
            let mut ends = vec![];
            for (t, p, offset) in &wanted {
                let offset = match (offset, &committed) {
                    (Offset::Stored, Some(c)) => {
                        match c.find_partition(t, *p).map(|e| e.offset()) {
                            Some(Offset::Offset(o)) => Offset::Offset(o),
                            _ => Offset::Beginning,
                        }
                    }
                    (o, _) => *o,
                };
                let watermarks = if bounded || offset == Offset::End {
                    Some(
                        consumer
                            .fetch_watermarks(t, *p, LOOKUP_TIMEOUT)
                            .map_err(|e| kafka_error(&def, "read partition offsets", e))?,
                    )
                } else {
                    None
                };
                let offset = match (offset, watermarks) {
                    (Offset::End, Some((_, high))) => Offset::Offset(high),
                    (o, _) => o,
                };
                ends.push(watermarks.filter(|_| bounded).map(|(low, high)| {
                    let start = match offset {
                        Offset::Offset(o) => o,
                        _ => low,
                    };
                    (start, high)
                }));
                resolved
                    .add_partition_offset(t, *p, offset)
                    .map_err(|e| kafka_error(&def, "assign partitions", e))?;
            }
            Ok((resolved, ends))
        })
        .await
        .map_err(|e| SqlError::internal(format!("kafka offset lookup failed: {e}")))?
    }

    /// The first offset at or after `ts` in each partition, as the broker finds it. Where
    /// it finds none, the partition is read from its start and records before `ts` are
    /// skipped as they come ([`Partition::from_time`]): brokers that do not index times
    /// (librdkafka's mock cluster) answer "none" for every partition.
    async fn offsets_for_time(
        &mut self,
        partitions: &[(String, i32)],
        ts: i64,
    ) -> SqlResult<TopicPartitionList> {
        let consumer = self.consumer()?;
        let def = self.def.clone();
        let mut query = TopicPartitionList::new();
        for (t, p) in partitions {
            query
                .add_partition_offset(t, *p, Offset::Offset(ts))
                .map_err(|e| kafka_error(&def, "look up offsets", e))?;
        }
        let mut found = tokio::task::spawn_blocking(move || {
            consumer
                .offsets_for_times(query, LOOKUP_TIMEOUT)
                .map_err(|e| kafka_error(&def, "look up offsets by timestamp", e))
        })
        .await
        .map_err(|e| SqlError::internal(format!("kafka offset lookup failed: {e}")))??;
        for (t, p) in partitions {
            let by_broker = found.find_partition(t, *p).map(|e| e.offset());
            if !matches!(by_broker, Some(Offset::Offset(_))) {
                found
                    .set_partition_offset(t, *p, Offset::Beginning)
                    .map_err(|e| kafka_error(&self.def, "look up offsets", e))?;
                self.from_time.push((t.clone(), *p));
            }
        }
        Ok(found)
    }

    /// Takes what the consumer has (waiting only for the first message; cancelling
    /// while waiting loses nothing) and decodes it into per-partition batches.
    async fn fetch(&mut self, consumer: &StreamConsumer) -> SqlResult<()> {
        let mut by_lane: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        let mut taken = 0;
        let first = tokio::select! {
            m = consumer.recv() => m,
            _ = tokio::time::sleep_until(self.next_discovery) => return Ok(()),
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Ok(m) => {
                    // Only assigned partitions deliver records.
                    let lane = self
                        .partitions
                        .iter()
                        .position(|p| p.partition == m.partition() && *p.topic == *m.topic());
                    if let Some(lane) = lane {
                        let record = Record {
                            meta: Metadata {
                                topic: self.partitions[lane].topic.clone(),
                                partition: m.partition(),
                                offset: m.offset(),
                                timestamp: m.timestamp().to_millis(),
                                timestamp_type: match m.timestamp() {
                                    rdkafka::Timestamp::CreateTime(_) => "CreateTime",
                                    rdkafka::Timestamp::LogAppendTime(_) => "LogAppendTime",
                                    rdkafka::Timestamp::NotAvailable => "NoTimestampType",
                                },
                                key: m.key().map(<[u8]>::to_vec),
                                headers: if self.decoders.wants_headers {
                                    headers_of(&m)
                                } else {
                                    vec![]
                                },
                                tombstone: m.payload().is_none(),
                            },
                            value: m.payload().map(<[u8]>::to_vec),
                        };
                        by_lane.entry(lane as u32).or_default().push(record);
                        taken += 1;
                    }
                }
                // librdkafka retries what it can; what reaches here is reported and
                // reading goes on (a partition's leader moving, a topic being created).
                Err(e) => tracing::warn!(table = %self.def.name, "kafka: {e}"),
            }
            if taken < self.batch_size {
                next = consumer.recv().now_or_never();
            }
        }
        for (lane, mut records) in by_lane {
            // A bounded read stops at each partition's end offset.
            if let Some((_, end)) = self.partitions[lane as usize].bounds {
                records.retain(|r| r.meta.offset < end);
                if records.is_empty() {
                    continue;
                }
            }
            let next = records.last().expect("grouped").meta.offset + 1;
            let partition = &mut self.partitions[lane as usize];
            if let Some(ts) = partition.from_time {
                match records
                    .iter()
                    .position(|r| r.meta.timestamp.is_some_and(|t| t >= ts))
                {
                    Some(first) => {
                        records.drain(..first);
                        partition.from_time = None;
                    }
                    None => records.clear(),
                }
            }
            let batch = self.decode(&records)?;
            self.pending.push_back(Pending { lane, batch, next });
        }
        Ok(())
    }

    /// Commits the positions to 'properties.group.id', for monitoring only: Weir's
    /// checkpoints hold the offsets it resumes from.
    fn commit_to_group(&self, places: &[(String, i32, Place)]) {
        let Some(consumer) = &self.consumer else {
            return;
        };
        let mut tpl = TopicPartitionList::new();
        for (t, p, place) in places {
            if let Some(next) = place.next {
                let _ = tpl.add_partition_offset(t, *p, Offset::Offset(next));
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(table = %self.def.name, "kafka offset commit: {e}");
            }
        }
    }

    /// A bounded read's partitions whose consumer position passed their last record:
    /// what is left before the end offset are no records (a transaction's commit
    /// marker takes an offset but is no message).
    fn skip_to_positions(&mut self) {
        let Some(Ok(positions)) = self.consumer.as_ref().map(|c| c.position()) else {
            return;
        };
        for p in &mut self.partitions {
            let Some((_, end)) = p.bounds else { continue };
            if let Some(Offset::Offset(at)) = positions
                .find_partition(&p.topic, p.partition)
                .map(|e| e.offset())
            {
                if at >= end && !p.done() {
                    p.next = Some(end);
                }
            }
        }
    }

    /// One partition's records as rows. Tombstones (no value) are no rows, except in
    /// an `upsert-kafka` table's changelog, where they are rows of the key alone.
    fn decode(&mut self, records: &[Record]) -> SqlResult<ChangeBatch> {
        let live: Vec<&Record> = records.iter().filter(|r| r.value.is_some()).collect();
        let rows = self.decode_values(&live)?;
        let dead: Vec<&Record> = records.iter().filter(|r| r.value.is_none()).collect();
        if !self.upsert || dead.is_empty() {
            return Ok(rows);
        }
        let tombstones = self.tombstones(&dead)?;
        Ok(ChangeBatch::new(arrow::compute::concat_batches(
            &self.decoders.schema,
            [&rows.rows, &tombstones],
        )?))
    }

    /// Rows of tombstones: the key's columns, the metadata, nulls elsewhere.
    fn tombstones(&mut self, records: &[&Record]) -> SqlResult<RecordBatch> {
        let d = &self.decoders;
        let (key_decoder, key_columns) = d.key.as_ref().expect("an upsert table has a key");
        let (kbuf, kranges) = joined(
            key_decoder.format(),
            records.iter().map(|r| r.meta.key.as_deref().or(Some(b""))),
        );
        let mut skipped = 0;
        let (keys, kept) = key_decoder.decode(&kbuf, &kranges, |i, problem| {
            if self.ignore_errors {
                skipped += 1;
                Ok(())
            } else {
                Err(bad_record(
                    &self.def,
                    key_decoder.format(),
                    records[i],
                    problem,
                ))
            }
        })?;
        self.skipped += skipped;
        let metas: Vec<&Metadata> = kept.iter().map(|&i| &records[i].meta).collect();
        let columns = d
            .schema
            .fields()
            .iter()
            .enumerate()
            .map(|(c, field)| {
                if let Some(k) = key_columns.iter().position(|&k| k == c) {
                    return Ok(keys.rows.column(k).clone());
                }
                if let Some((_, f)) = d.metadata.iter().find(|(m, _)| *m == c) {
                    return metadata::column(*f, &metas, field.data_type());
                }
                Ok(arrow::array::new_null_array(field.data_type(), kept.len()))
            })
            .collect::<SqlResult<Vec<ArrayRef>>>()?;
        Ok(RecordBatch::try_new_with_options(
            d.schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(kept.len())),
        )?)
    }

    /// Rows of messages with a value.
    fn decode_values(&mut self, records: &[&Record]) -> SqlResult<ChangeBatch> {
        let d = &self.decoders;
        let (buf, ranges) = joined(d.value.format(), records.iter().map(|r| r.value.as_deref()));
        let ignore = self.ignore_errors;
        let mut skipped = 0;
        let def = &self.def;
        let bad = |format: Format, r: &Record, problem: String, skipped: &mut u64| {
            if ignore {
                *skipped += 1;
                Ok(())
            } else {
                Err(bad_record(def, format, r, problem))
            }
        };
        let (values, mut kept) = d.value.decode(&buf, &ranges, |i, problem| {
            bad(d.value.format(), records[i], problem, &mut skipped)
        })?;
        if d.key.is_none() && d.metadata.is_empty() {
            // The value holds every column.
            self.skipped += skipped;
            return Ok(values);
        }
        let mut values = values.rows;
        let mut keys = None;
        if let Some((key_decoder, _)) = &d.key {
            let (kbuf, kranges) = joined(
                key_decoder.format(),
                kept.iter()
                    .map(|&i| records[i].meta.key.as_deref().or(Some(b""))),
            );
            let (k, key_kept) = key_decoder.decode(&kbuf, &kranges, |i, problem| {
                bad(
                    key_decoder.format(),
                    records[kept[i]],
                    problem,
                    &mut skipped,
                )
            })?;
            // Rows whose key was bad are dropped from the values too.
            if key_kept.len() != kept.len() {
                let take = arrow::array::UInt32Array::from(
                    key_kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                );
                values = arrow::compute::take_record_batch(&values, &take)?;
                kept = key_kept.iter().map(|&i| kept[i]).collect();
            }
            keys = Some(k.rows);
        }
        self.skipped += skipped;
        let metas: Vec<&Metadata> = kept.iter().map(|&i| &records[i].meta).collect();
        let columns = (0..d.schema.fields().len())
            .map(|c| {
                if let Some(v) = d.value_columns.iter().position(|&v| v == c) {
                    return Ok(values.column(v).clone());
                }
                if let Some((_, field)) = d.metadata.iter().find(|(m, _)| *m == c) {
                    return metadata::column(*field, &metas, d.schema.field(c).data_type());
                }
                let (_, key_columns) = d.key.as_ref().expect("a column of the key");
                let k = key_columns
                    .iter()
                    .position(|&k| k == c)
                    .expect("key column");
                Ok(keys.as_ref().expect("keys decoded").column(k).clone())
            })
            .collect::<SqlResult<Vec<ArrayRef>>>()?;
        Ok(ChangeBatch::new(RecordBatch::try_new_with_options(
            d.schema.clone(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(kept.len())),
        )?))
    }
}

struct Record {
    meta: Metadata,
    value: Option<Vec<u8>>,
}

fn headers_of(m: &impl Message) -> Vec<(String, Option<Vec<u8>>)> {
    use rdkafka::message::Headers;
    m.headers().map_or_else(Vec::new, |h| {
        h.iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect()
    })
}

/// Records in one buffer, each ending in a newline except for 'raw'.
fn joined<'a>(
    format: Format,
    records: impl Iterator<Item = Option<&'a [u8]>>,
) -> (Vec<u8>, Vec<Range<usize>>) {
    let mut buf = vec![];
    let mut ranges = vec![];
    for r in records {
        let start = buf.len();
        buf.extend_from_slice(r.unwrap_or_default());
        if format != Format::Raw {
            buf.push(b'\n');
        }
        ranges.push(start..buf.len());
    }
    (buf, ranges)
}

fn bad_record(def: &TableDef, format: Format, r: &Record, problem: String) -> SqlError {
    SqlError::new(
        sqlstate::INVALID_TEXT_REPRESENTATION,
        format!(
            "bad {} record in kafka topic '{}' partition {} at offset {}: {problem}",
            format.name(),
            r.meta.topic,
            r.meta.partition,
            r.meta.offset
        ),
    )
    .with_hint(format!(
        "fix the record, or set '{}' = 'true' on table \"{}\" to skip bad records",
        format.ignore_errors_option(),
        def.name
    ))
}

#[async_trait]
impl crate::connector::io::SplitReader for KafkaSource {
    async fn next_batch(&mut self) -> Result<Option<ChangeBatch>> {
        loop {
            if let Some(p) = self.pending.pop_front() {
                self.partitions[p.lane as usize].next = Some(p.next);
                self.last_lane = Some((p.lane, self.partitions.len() as u32));
                if p.batch.num_rows() == 0 {
                    continue;
                }
                return Ok(Some(p.batch));
            }
            if Instant::now() >= self.next_discovery {
                self.discover().await.map_err(to_df)?;
                self.next_discovery = if self.bounded {
                    // A bounded read takes the partitions there were at its start.
                    Instant::now() + Duration::from_secs(86_400 * 365)
                } else {
                    Instant::now() + self.discovery
                };
            }
            if self.bounded && !self.partitions.iter().all(Partition::done) {
                self.skip_to_positions();
            }
            if self.bounded && self.partitions.iter().all(Partition::done) {
                return Ok(None);
            }
            let consumer = self.consumer().map_err(to_df)?;
            self.fetch(&consumer).await.map_err(to_df)?;
        }
    }

    fn position(&self) -> Vec<u8> {
        let mut places: Vec<(String, i32, Place)> = self
            .partitions
            .iter()
            .map(|p| {
                let place = Place {
                    next: p.next,
                    from_time: p.from_time,
                };
                (p.topic.to_string(), p.partition, place)
            })
            .collect();
        // Partitions restored but not assigned yet keep their place.
        for ((t, p), place) in &self.restored {
            if !self
                .partitions
                .iter()
                .any(|q| *q.topic == **t && q.partition == *p)
            {
                places.push((t.clone(), *p, *place));
            }
        }
        places.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        if self.commit_to_group {
            self.commit_to_group(&places);
        }
        serde_json::to_vec(&places).expect("positions serialize")
    }

    fn restore(&mut self, position: &[u8]) -> Result<()> {
        let places: Vec<(String, i32, Place)> = serde_json::from_slice(position)
            .map_err(|e| to_df(SqlError::internal(format!("bad kafka position: {e}"))))?;
        if !self.partitions.is_empty() {
            return Err(to_df(SqlError::internal(
                "a kafka source is restored before it reads",
            )));
        }
        self.restored = places.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        Ok(())
    }

    fn skipped_records(&self) -> u64 {
        self.skipped
    }

    fn lane(&self) -> LaneOf {
        self.last_lane
    }
}
