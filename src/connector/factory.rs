//! Opens the reader or writer a table's connector names, and what connectors share:
//! option parsing, errors, rate limits and moving blocking file work off the async workers.

use std::sync::Arc;
use std::time::Duration;

use datafusion::common::Result;
use datafusion::error::DataFusionError;
use tokio::time::Instant;
use weir_catalog::TableDef;

use super::datagen::DatagenReader;
use super::filesystem::{FileSink, FileSource};
use super::io::{EpochWriter, SinkWriter, SplitReader};
use super::kafka::sink::{Guarantee, KafkaSink, WriteAhead};
use super::kafka::source::KafkaSource;
use super::kafka::transactions::Transactions;
use super::nexmark::NexmarkReader;
use super::options::parse_duration;
use super::print::{BlackholeSink, PrintSink};
use crate::sql::error::{sqlstate, SqlError, SqlResult};
use crate::stream::graph::ChangelogMode;

/// The reader for split `split` (0-based) of `splits` parallel source subtasks.
pub fn open_split(
    def: &TableDef,
    split: usize,
    splits: usize,
    batch_size: usize,
    read: Option<&[bool]>,
) -> SqlResult<Box<dyn SplitReader>> {
    if splits == 0 || split >= splits {
        return Err(SqlError::internal(format!(
            "split {split} of {splits} does not exist"
        )));
    }
    let batch_size = batch_size.max(1);
    Ok(match def.connector() {
        Some("datagen") => Box::new(DatagenReader::open(def, split, splits, batch_size)?),
        Some("nexmark") => Box::new(NexmarkReader::open_reading(
            def, split, splits, batch_size, read,
        )?),
        Some("filesystem") => Box::new(FileSource::open(def, split, splits, batch_size)?),
        Some("kafka" | "upsert-kafka") => {
            Box::new(KafkaSource::open(def, split, splits, batch_size)?)
        }
        Some(other) => return Err(not_a(def, other, "source")),
        None => {
            return Err(SqlError::internal(format!(
                "table \"{}\" has no connector; it is read from Weir's own log",
                def.name
            )))
        }
    })
}

/// How a table's rows change when read as a stream: a table in a changelog format
/// ('debezium-json') and a table of Weir's log with a primary key (which takes UPDATE,
/// DELETE and upserts) retract rows; every other table only ever gains rows.
pub fn source_changelog(def: &TableDef) -> ChangelogMode {
    let changelog_format = ["format", "value.format"]
        .iter()
        .any(|k| def.options.get(*k).is_some_and(|f| f == "debezium-json"));
    let keyed_log = def.connector().is_none() && !def.primary_key.is_empty();
    if changelog_format || keyed_log {
        ChangelogMode::Retract
    } else {
        ChangelogMode::InsertOnly
    }
}

/// Connectors a job can write to.
pub const SINKS: &[&str] = &["filesystem", "kafka", "upsert-kafka", "print", "blackhole"];

/// The most source subtasks that can have work: a filesystem source has one split per
/// file, and a subtask without a split would hold the watermark back for nothing. A
/// changelog is read by one subtask, file after file: a later file may update a row an
/// earlier one created, and splits read in parallel would not keep that order.
pub fn max_splits(def: &TableDef) -> Option<usize> {
    if def.connector().is_some() && source_changelog(def) == ChangelogMode::Retract {
        return Some(1);
    }
    match def.connector() {
        Some("filesystem") => {
            let path = std::path::Path::new(def.options.get("path")?);
            Some(super::filesystem::list_files(path).ok()?.len().max(1))
        }
        _ => None,
    }
}

/// For a source whose splits can be divided anew when a job is restored at another
/// parallelism, one position holding what the old splits' `positions` (in split order)
/// recorded, which every new split restores: Kafka's partitions are dealt to the new
/// splits, each from its furthest place; the generators' numbers and a path's files are
/// dealt as before (`split + i * splits`), skipping those the old splits read
/// ([`super::share`]). `None` for sources whose splits keep their parallelism.
pub fn merge_positions(def: &TableDef, positions: &[&[u8]]) -> Option<SqlResult<Vec<u8>>> {
    if !resplits(def) {
        return None;
    }
    Some(match def.connector() {
        Some("kafka") => super::kafka::source::merge_positions(positions),
        Some("filesystem") => super::filesystem::merge_positions(def, positions),
        _ => super::share::merge::<()>(positions),
    })
}

/// Whether [`merge_positions`] takes the table's source: every connector's but a
/// changelog's (read by one split, in order) and upsert-kafka's.
pub fn resplits(def: &TableDef) -> bool {
    let connector = matches!(
        def.connector(),
        Some("kafka" | "datagen" | "nexmark" | "filesystem")
    );
    connector && source_changelog(def) == ChangelogMode::InsertOnly
}

/// Whether the table's source ends (filesystem, datagen with a row count or sequence,
/// nexmark with an event count).
pub fn is_bounded(def: &TableDef) -> bool {
    match def.connector() {
        Some("filesystem") => true,
        Some("datagen") => DatagenReader::is_bounded(def),
        Some("nexmark") => def.options.contains_key("nexmark.event.num"),
        Some("kafka" | "upsert-kafka") => super::kafka::source::is_bounded(def).unwrap_or(false),
        _ => false,
    }
}

/// The writer of sink subtask `subtask` for job `job_id` (files the sink writes are named
/// after both).
pub fn open_sink(def: &TableDef, subtask: usize, job_id: &str) -> SqlResult<Box<dyn SinkWriter>> {
    Ok(match def.connector() {
        Some("filesystem") => Box::new(FileSink::open(def, subtask, job_id)?),
        Some("print") => Box::new(PrintSink::open(def, Some(subtask))?),
        Some("blackhole") => Box::new(BlackholeSink),
        Some("kafka" | "upsert-kafka") => Box::new(KafkaSink::open(def, subtask, job_id)?),
        Some(other) => return Err(not_a(def, other, "sink")),
        None => {
            return Err(SqlError::internal(format!(
                "table \"{}\" has no connector; it is written to Weir's own log",
                def.name
            )))
        }
    })
}

/// What writes a job's committed epochs when its sink cannot do that itself (a Kafka
/// sink in 'write-ahead' or 'transactional' exactly-once mode).
pub fn open_epoch_writer(def: &TableDef, job: &str) -> SqlResult<Option<Arc<dyn EpochWriter>>> {
    if !matches!(def.connector(), Some("kafka" | "upsert-kafka")) {
        return Ok(None);
    }
    Ok(match Guarantee::of(def)? {
        Guarantee::WriteAhead => Some(Arc::new(WriteAhead::open(def, job)?)),
        Guarantee::Transactional => Some(Arc::new(Transactions::open(def, job)?)),
        _ => None,
    })
}

fn not_a(def: &TableDef, connector: &str, role: &str) -> SqlError {
    let can = match role {
        "source" => "datagen, nexmark, filesystem and kafka",
        _ => "filesystem, kafka, upsert-kafka, print and blackhole",
    };
    SqlError::not_supported(format!(
        "table \"{}\" uses connector '{connector}', which this Weir version cannot use as a \
         {role}; {can} can",
        def.name
    ))
}

pub(crate) fn invalid(message: impl Into<String>) -> SqlError {
    SqlError::new(sqlstate::INVALID_PARAMETER_VALUE, message)
}

/// A `SqlError` as the `DataFusionError` the reader and writer traits return; converting
/// back (`SqlError::from`) gives the original.
pub(crate) fn to_df(e: SqlError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

pub(crate) fn opt_u64(def: &TableDef, key: &str) -> SqlResult<Option<u64>> {
    def.options
        .get(key)
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                invalid(format!(
                    "bad value '{v}' for option '{key}'; expected a non-negative integer"
                ))
            })
        })
        .transpose()
}

pub(crate) fn opt_bool(def: &TableDef, key: &str) -> SqlResult<bool> {
    match def.options.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(v) => Err(invalid(format!(
            "bad value '{v}' for option '{key}'; expected 'true' or 'false'"
        ))),
    }
}

pub(crate) fn opt_duration(def: &TableDef, key: &str) -> SqlResult<Option<Duration>> {
    def.options
        .get(key)
        .map(|v| {
            parse_duration(v).ok_or_else(|| {
                invalid(format!(
                    "bad value '{v}' for option '{key}'; expected a duration such as '5 s'"
                ))
            })
        })
        .transpose()
}

/// Paces a reader at `rate` units per second: `wait(n)` returns when the `n` units after
/// those already allowed are due. Unit 0 is due when pacing starts, or, for a throttle
/// that follows the wall clock, at a given time.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: f64,
    start: Option<Instant>,
    /// Milliseconds since 1970 at which unit 0 is due, when pacing follows the clock.
    origin_ms: Option<i64>,
    allowed: u64,
}

impl Throttle {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            rate,
            start: None,
            origin_ms: None,
            allowed: 0,
        }
    }

    /// Unit `k` is due at `origin_ms + k / rate` on the wall clock; units already due
    /// come at once.
    pub(crate) fn from_wall_clock(rate: f64, origin_ms: i64) -> Self {
        Self {
            origin_ms: Some(origin_ms),
            ..Self::new(rate)
        }
    }

    /// How many units a step should take so steps come about twenty times a second, or,
    /// following the wall clock, every millisecond (a unit's time then means something:
    /// the nexmark generator's event time, so it comes out within a millisecond of it).
    pub(crate) fn step(&self) -> u64 {
        let steps_per_second = if self.origin_ms.is_some() {
            1000.0
        } else {
            20.0
        };
        ((self.rate / steps_per_second) as u64).max(1)
    }

    /// Cancel-safe: the units count as allowed only once they are due (readers wait in
    /// a `select!` that a barrier can win).
    pub(crate) async fn wait(&mut self, n: u64) {
        let ahead = self.allowed as f64 / self.rate;
        match self.origin_ms {
            Some(origin) => {
                let due_ms = origin as f64 + ahead * 1000.0;
                let now_ms = crate::stream::message::wall_clock_ms() as f64;
                if due_ms > now_ms {
                    tokio::time::sleep(Duration::from_secs_f64((due_ms - now_ms) / 1000.0)).await;
                }
            }
            None => {
                let start = *self.start.get_or_insert_with(Instant::now);
                tokio::time::sleep_until(start + Duration::from_secs_f64(ahead)).await;
            }
        }
        self.allowed += n;
    }

    /// Pacing after a restore that resumes after `done` units: a throttle following the
    /// wall clock goes on from there, another starts afresh.
    pub(crate) fn resume(&mut self, done: u64) {
        self.start = None;
        self.allowed = if self.origin_ms.is_some() { done } else { 0 };
    }
}

/// Runs `f` on `state` on tokio's blocking pool, so file I/O does not stall async workers.
pub(crate) async fn blocking<S, R>(
    state: &mut Option<S>,
    f: impl FnOnce(&mut S) -> R + Send + 'static,
) -> Result<R>
where
    S: Send + 'static,
    R: Send + 'static,
{
    let mut s = state
        .take()
        .ok_or_else(|| to_df(SqlError::internal("connector used after a failed call")))?;
    let (s, r) = tokio::task::spawn_blocking(move || {
        let r = f(&mut s);
        (s, r)
    })
    .await
    .map_err(|e| to_df(SqlError::internal(format!("connector task failed: {e}"))))?;
    *state = Some(s);
    Ok(r)
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::collections::BTreeMap;

    use datafusion::arrow::util::display::array_value_to_string;
    use weir_catalog::{ColumnDef, SqlType, TableDef, TableId};

    /// Reads the table's source through layouts of splits in turn: `(splits, batches)`
    /// has split k of `splits` read up to `k * batches` batches (so they are uneven; the
    /// last layout reads to the end), and the next layout restores the positions merged.
    /// Returns every row read, as text, sorted.
    pub async fn read_rescaled(
        def: &TableDef,
        layouts: &[(usize, usize)],
        batch_size: usize,
    ) -> Vec<String> {
        let mut rows = Vec::new();
        let mut merged: Option<Vec<u8>> = None;
        for (i, &(splits, batches)) in layouts.iter().enumerate() {
            let last = i + 1 == layouts.len();
            let mut positions = Vec::new();
            for split in 0..splits {
                let mut r = super::open_split(def, split, splits, batch_size, None).unwrap();
                if let Some(p) = &merged {
                    r.restore(p).unwrap();
                }
                let mut read = 0;
                while last || read < split * batches {
                    let Some(b) = r.next_batch().await.unwrap() else {
                        break;
                    };
                    read += 1;
                    let b = b.rows;
                    for row in 0..b.num_rows() {
                        let values: Vec<String> = b
                            .columns()
                            .iter()
                            .map(|c| array_value_to_string(c, row).unwrap())
                            .collect();
                        rows.push(values.join(","));
                    }
                }
                positions.push(r.position());
            }
            let refs: Vec<&[u8]> = positions.iter().map(Vec::as_slice).collect();
            merged = Some(super::merge_positions(def, &refs).unwrap().unwrap());
        }
        rows.sort();
        rows
    }

    pub fn table(columns: &[(&str, SqlType)], options: &[(&str, &str)]) -> TableDef {
        TableDef {
            id: TableId(1),
            name: "t".into(),
            columns: columns
                .iter()
                .map(|(n, t)| ColumnDef {
                    name: n.to_string(),
                    data_type: t.clone(),
                    nullable: true,
                    metadata: None,
                })
                .collect(),
            computed: vec![],
            primary_key: vec![],
            watermark: None,
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }
}
