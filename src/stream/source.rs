//! Source subtasks: read a split, add computed columns, generate watermarks.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;
use tokio::sync::watch;
use weir_catalog::{Catalog, TableDef};

use super::graph::{SourceKind, SourceSpec, TimeSource};
use super::message::{ChangeBatch, Epoch, Millis, NO_WATERMARK};
use super::mv::MvState;
use crate::connector::io::SplitReader;

/// Rows per batch sources aim for.
pub const BATCH_SIZE: usize = 8192;

/// What a reader produced.
// Rows are nearly every read; boxing them would allocate once per batch for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Read {
    /// Physical rows, with their changes when the source is a changelog.
    Rows(ChangeBatch),
    /// An upstream view published up to this watermark.
    Watermark(Millis),
    End,
}

/// Reads one split of a source.
pub enum Reader {
    Split(Box<dyn SplitReader>),
    Log(LogReader),
    View(ViewReader),
    /// The batches left, and how many were taken.
    Batches(std::collections::VecDeque<RecordBatch>, u64),
}

fn position_bytes(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn position_of(bytes: &[u8]) -> Result<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| DataFusionError::Internal("a stored source position is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

impl Reader {
    pub fn open(
        kind: &SourceKind,
        catalog: &Arc<Catalog>,
        split: usize,
        splits: usize,
    ) -> Result<Self> {
        Ok(match kind {
            SourceKind::Log { def, until } => Reader::Log(LogReader {
                catalog: catalog.clone(),
                def: def.clone(),
                next: 0,
                until: *until,
                appends: crate::connector::log_table::appends(),
                queue: Default::default(),
            }),
            SourceKind::Connector { def, read } => Reader::Split(
                crate::connector::factory::open_split(
                    def,
                    split,
                    splits,
                    BATCH_SIZE,
                    read.as_deref(),
                )
                .map_err(|e| DataFusionError::External(Box::new(e)))?,
            ),
            SourceKind::View { state, bounded } => Reader::View(ViewReader {
                state: state.clone(),
                next: 0,
                watermark: NO_WATERMARK,
                bounded: *bounded,
                changes: state.subscribe(),
                queue: Default::default(),
                feed: None,
                delivered: 0,
                skip: 0,
                followed: None,
            }),
            SourceKind::Batches(batches) => Reader::Batches(
                if split == 0 {
                    batches.iter().cloned().collect()
                } else {
                    Default::default()
                },
                0,
            ),
        })
    }

    /// Where the reader is, once everything it read was delivered: [`Reader::restore`]
    /// with it continues right after.
    pub fn position(&self) -> Result<Vec<u8>> {
        Ok(match self {
            Reader::Split(r) => r.position(),
            Reader::Log(r) => position_bytes(r.next),
            Reader::View(r) => r.position(),
            Reader::Batches(_, taken) => position_bytes(*taken),
        })
    }

    pub fn restore(&mut self, position: &[u8]) -> Result<()> {
        match self {
            Reader::Split(r) => r.restore(position)?,
            Reader::Log(r) => r.next = position_of(position)?,
            Reader::View(r) => r.restore(position)?,
            Reader::Batches(q, taken) => {
                *taken = position_of(position)?;
                for _ in 0..*taken {
                    q.pop_front();
                }
            }
        }
        Ok(())
    }

    /// Malformed records the reader skipped so far.
    pub fn skipped_records(&self) -> u64 {
        match self {
            Reader::Split(r) => r.skipped_records(),
            _ => 0,
        }
    }

    /// The partition the last rows came from, for a reader of several.
    pub fn lane(&self) -> LaneOf {
        match self {
            Reader::Split(r) => r.lane(),
            _ => None,
        }
    }

    /// Waits for the next rows.
    pub async fn next(&mut self) -> Result<Read> {
        match self {
            Reader::Split(r) => Ok(match r.next_batch().await? {
                Some(b) => Read::Rows(b),
                None => Read::End,
            }),
            Reader::Log(r) => r.next().await,
            Reader::View(r) => r.next().await,
            Reader::Batches(q, taken) => Ok(match q.pop_front() {
                Some(b) => {
                    *taken += 1;
                    Read::Rows(ChangeBatch::new(b))
                }
                None => Read::End,
            }),
        }
    }

    /// Rows already available without waiting: what was appended to a log or published by
    /// a view before a barrier was requested must reach the barrier's epoch.
    pub fn available_now(&mut self) -> Result<Vec<Read>> {
        match self {
            Reader::Log(r) => r.read_available(),
            Reader::View(r) => {
                r.fill()?;
                Ok(r.queue.drain(..).collect())
            }
            _ => Ok(vec![]),
        }
    }
}

pub struct LogReader {
    catalog: Arc<Catalog>,
    def: Arc<TableDef>,
    /// The offset after the last entry read (queued or delivered).
    next: u64,
    until: Option<u64>,
    appends: watch::Receiver<u64>,
    queue: std::collections::VecDeque<Read>,
}

impl LogReader {
    fn read_available(&mut self) -> Result<Vec<Read>> {
        let mut out: Vec<Read> = self.queue.drain(..).collect();
        out.extend(self.read_new()?);
        Ok(out)
    }

    fn read_new(&mut self) -> Result<Vec<Read>> {
        if self.until.is_some_and(|u| self.next >= u) {
            return Ok(vec![]);
        }
        let entries = self
            .catalog
            .table_log()
            .read_from(self.def.id, self.next)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        let mut out = Vec::new();
        for entry in entries {
            if self.until.is_some_and(|u| entry.offset >= u) {
                break;
            }
            self.next = entry.offset + 1;
            out.push(Read::Rows(ChangeBatch {
                rows: entry.batch,
                watermarks: None,
                ops: entry.ops,
            }));
        }
        Ok(out)
    }

    async fn next(&mut self) -> Result<Read> {
        loop {
            if let Some(read) = self.queue.pop_front() {
                return Ok(read);
            }
            if self.until.is_some_and(|u| self.next >= u) {
                return Ok(Read::End);
            }
            self.appends.borrow_and_update();
            let new = self.read_new()?;
            if !new.is_empty() {
                self.queue.extend(new);
                continue;
            }
            if self.until.is_some() {
                return Ok(Read::End);
            }
            if self.appends.changed().await.is_err() {
                return Ok(Read::End);
            }
        }
    }
}

/// Where a reader of an updating view was: the lineage of the view's checkpoints and the
/// last epoch of its job it had read; `None` when it had not started following it.
pub fn followed_position(position: &[u8]) -> Result<Option<(u64, Epoch)>> {
    if position.len() != 16 {
        return Err(DataFusionError::Internal(
            "a stored position in an updating view is not 16 bytes".into(),
        ));
    }
    let lineage = position_of(&position[..8])?;
    let epoch = position_of(&position[8..])?;
    Ok((lineage != 0).then_some((lineage, epoch)))
}

pub struct ViewReader {
    state: Arc<MvState>,
    next: usize,
    watermark: Millis,
    bounded: bool,
    changes: watch::Receiver<u64>,
    queue: std::collections::VecDeque<Read>,
    /// An updating view is followed through its changefeed (its rows are rebuilt, so a
    /// batch position means nothing): its snapshot as inserts, then every publish.
    feed: Option<tokio::sync::broadcast::Receiver<Arc<crate::stream::mv::Changes>>>,
    /// Rows of an insert-only view queued so far: the position a checkpoint records.
    delivered: u64,
    /// Rows a restored reader already delivered before the restart.
    skip: u64,
    /// An updating view's: the lineage of the view's checkpoints and the last epoch of
    /// its job whose changes were queued (the position a checkpoint records). Set once
    /// followed, or restored.
    followed: Option<(u64, Epoch)>,
}

impl ViewReader {
    fn follows_changes(&self) -> bool {
        self.state.updating && !self.bounded
    }

    /// An updating view's reader records where it is in the view's epochs (16 bytes:
    /// lineage, epoch; a lineage of 0 is a reader that had not started following);
    /// others the rows delivered (8 bytes).
    fn position(&self) -> Vec<u8> {
        if !self.follows_changes() {
            return position_bytes(self.delivered);
        }
        let (lineage, epoch) = self.followed.unwrap_or((0, 0));
        [lineage.to_be_bytes(), epoch.to_be_bytes()].concat()
    }

    fn restore(&mut self, position: &[u8]) -> Result<()> {
        if !self.follows_changes() {
            self.skip = position_of(position)?;
            self.delivered = self.skip;
            return Ok(());
        }
        self.followed = followed_position(position)?;
        Ok(())
    }

    fn fill(&mut self) -> Result<()> {
        if self.follows_changes() {
            return self.fill_from_feed();
        }
        let published = self.state.read_from(self.next);
        self.next = published.next;
        for batch in published.batches {
            let skipped = self.skip.min(batch.num_rows() as u64) as usize;
            self.skip -= skipped as u64;
            let batch = batch.slice(skipped, batch.num_rows() - skipped);
            if batch.num_rows() > 0 {
                self.delivered += batch.num_rows() as u64;
                self.queue.push_back(Read::Rows(ChangeBatch::new(batch)));
            }
        }
        if published.watermark > self.watermark {
            self.watermark = published.watermark;
            self.queue.push_back(Read::Watermark(published.watermark));
        }
        if published.ended || self.bounded {
            self.queue.push_back(Read::End);
            self.bounded = false;
            self.next = usize::MAX;
        }
        Ok(())
    }

    /// Starts following the view's changefeed: from its rows as they are, or, restored,
    /// from the stored changes after the recorded epoch. Whether its input ended.
    fn start_following(&mut self) -> Result<bool> {
        let Some((lineage, epoch)) = self.followed else {
            let followed = self.state.follow()?;
            self.queue.extend(
                followed
                    .snapshot
                    .into_iter()
                    .map(|b| Read::Rows(ChangeBatch::new(b))),
            );
            self.feed = Some(followed.changes);
            let lineage = self.state.log().map_or(0, |(_, l)| l);
            self.followed = (lineage != 0).then_some((lineage, followed.epoch));
            return Ok(followed.ended);
        };
        let resumed = self.state.resume(lineage, epoch)?.map_err(|why| {
            DataFusionError::External(Box::new(crate::sql::error::SqlError::new(
                "55000",
                format!("cannot go on reading the view after its epoch {epoch}: {why}"),
            )))
        })?;
        self.queue
            .extend(resumed.changes.into_iter().map(Read::Rows));
        self.feed = Some(resumed.receiver);
        self.followed = Some((lineage, resumed.epoch));
        Ok(resumed.ended)
    }

    fn fill_from_feed(&mut self) -> Result<()> {
        use tokio::sync::broadcast::error::TryRecvError;
        let mut ended = false;
        if self.feed.is_none() {
            ended |= self.start_following()?;
        }
        let feed = self.feed.as_mut().expect("following");
        loop {
            match feed.try_recv() {
                Ok(published) => {
                    // A publish the stored changes a restored reader started from had.
                    if let Some((_, followed)) = &mut self.followed {
                        if published.epoch <= *followed {
                            continue;
                        }
                        *followed = published.epoch;
                    }
                    self.queue
                        .extend(published.changes.iter().map(|c| Read::Rows(c.clone())));
                    ended |= published.ended;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => {
                    ended = true;
                    break;
                }
                // Fell behind the publishes the feed holds: the view's stored changes
                // have them (a fold keeps what a registered reader has not passed).
                Err(TryRecvError::Lagged(_)) if self.followed.is_some() => {
                    self.feed = None;
                    return self.fill_from_feed();
                }
                Err(TryRecvError::Lagged(n)) => {
                    return Err(DataFusionError::External(Box::new(
                        crate::sql::error::SqlError::new(
                            "53000",
                            format!(
                                "this query fell {n} publishes behind the view it reads and \
                                 stopped; recreate it"
                            ),
                        ),
                    )))
                }
            }
        }
        let watermark = self.state.read_from(usize::MAX).watermark;
        if watermark > self.watermark {
            self.watermark = watermark;
            self.queue.push_back(Read::Watermark(watermark));
        }
        if ended {
            self.queue.push_back(Read::End);
            self.next = usize::MAX;
        }
        Ok(())
    }

    async fn next(&mut self) -> Result<Read> {
        loop {
            if let Some(read) = self.queue.pop_front() {
                return Ok(read);
            }
            if self.next == usize::MAX {
                std::future::pending::<()>().await;
            }
            self.changes.borrow_and_update();
            self.fill()?;
            if self.queue.is_empty() && self.changes.changed().await.is_err() {
                return Ok(Read::End);
            }
        }
    }
}

/// Adds computed columns and generates watermarks for one source subtask.
pub struct SourceRows {
    schema: SchemaRef,
    computed: Vec<Arc<dyn PhysicalExpr>>,
    time: TimeSource,
    /// The watermark expression when it is `column - fixed interval`: (column, interval in
    /// milliseconds). Arrow subtracts intervals from timestamps row by row through chrono,
    /// which dominated sources; a fixed length of time is an integer subtraction.
    minus_millis: Option<(usize, i64)>,
    pub watermark: Millis,
    /// Per-partition watermarks of a reader of several partitions (Kafka): the source's
    /// watermark is the lowest of the partitions that are not idle.
    lanes: Vec<Lane>,
}

struct Lane {
    watermark: Millis,
    last_rows: std::time::Instant,
}

/// Which partition (lane) of how many a batch came from.
pub type LaneOf = Option<(u32, u32)>;

/// `(column, ms)` when `expr` is `column - INTERVAL` over a millisecond timestamp column
/// of `schema`, the interval being a whole number of milliseconds without months or days
/// (whose length depends on the date).
fn column_minus_millis(expr: &Arc<dyn PhysicalExpr>, schema: &SchemaRef) -> Option<(usize, i64)> {
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    if *binary.op() != Operator::Minus {
        return None;
    }
    let column = binary.left().downcast_ref::<Column>()?;
    let field = schema.fields().get(column.index())?;
    if field.name() != column.name()
        || !matches!(
            field.data_type(),
            DataType::Timestamp(TimeUnit::Millisecond, _)
        )
    {
        return None;
    }
    let millis = match binary.right().downcast_ref::<Literal>()?.value() {
        ScalarValue::IntervalMonthDayNano(Some(i))
            if i.months == 0 && i.days == 0 && i.nanoseconds % 1_000_000 == 0 =>
        {
            i.nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(i)) if i.days == 0 => i.milliseconds as i64,
        _ => return None,
    };
    Some((column.index(), millis))
}

impl SourceRows {
    pub fn new(spec: &SourceSpec, schema: SchemaRef) -> Self {
        let minus_millis = match &spec.time {
            TimeSource::Watermark { expr, .. } => column_minus_millis(expr, &schema),
            _ => None,
        };
        Self {
            schema,
            computed: spec.computed.clone(),
            time: spec.time.clone(),
            minus_millis,
            watermark: NO_WATERMARK,
            lanes: vec![],
        }
    }

    /// The lowest watermark of the lanes other than `except` that had rows within the
    /// idle timeout (`Millis::MAX` when there are none).
    fn active_lanes_min(&self, except: Option<usize>) -> Millis {
        let now = std::time::Instant::now();
        let timeout = self.idle_timeout();
        self.lanes
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .filter(|(_, l)| timeout.is_none_or(|t| now.duration_since(l.last_rows) < t))
            .map(|(_, l)| l.watermark)
            .min()
            .unwrap_or(Millis::MAX)
    }

    pub fn idle_timeout(&self) -> Option<Duration> {
        match &self.time {
            TimeSource::Watermark { idle_timeout, .. } => *idle_timeout,
            _ => None,
        }
    }

    pub fn processing_time(&self) -> bool {
        matches!(self.time, TimeSource::Processing)
    }

    /// The full rows of a physical batch, each with the watermark it meets and the
    /// change it makes (inserts unless the source is a changelog).
    pub fn prepare(&mut self, physical: ChangeBatch, lane: LaneOf) -> Result<ChangeBatch> {
        let ChangeBatch {
            rows: physical,
            ops,
            ..
        } = physical;
        let rows = if self.computed.is_empty() && physical.schema() == self.schema {
            physical
        } else {
            let n = physical.num_rows();
            let mut columns: Vec<ArrayRef> = physical.columns().to_vec();
            for expr in &self.computed {
                columns.push(expr.evaluate(&physical)?.into_array(n)?);
            }
            super::batch_of(self.schema.clone(), columns, n)?
        };
        let mut batch = ChangeBatch::new(rows);
        batch.ops = ops;
        match &self.time {
            TimeSource::Watermark { expr, .. } => {
                // Without lanes the watermark follows the rows; with lanes, this lane's
                // watermark does, and the source's is capped by the other active lanes.
                let (lane, cap) = match lane {
                    Some((lane, lanes)) => {
                        let now = std::time::Instant::now();
                        let count = self.lanes.len().max(lanes as usize);
                        self.lanes.resize_with(count, || Lane {
                            watermark: NO_WATERMARK,
                            last_rows: now,
                        });
                        self.lanes[lane as usize].last_rows = now;
                        (
                            Some(lane as usize),
                            self.active_lanes_min(Some(lane as usize)),
                        )
                    }
                    None => (None, Millis::MAX),
                };
                let mut current = self.watermark;
                let mut lane_watermark = lane.map_or(current, |l| self.lanes[l].watermark);
                let mut meets = Vec::with_capacity(batch.num_rows());
                let mut advance = |meets: &mut Vec<Millis>, v: Option<Millis>| {
                    meets.push(current);
                    if let Some(v) = v {
                        lane_watermark = lane_watermark.max(v);
                        current = current.max(lane_watermark.min(cap));
                    }
                };
                let fast = self
                    .minus_millis
                    .map(|(column, ms)| (to_millis(batch.rows.column(column)), ms));
                match fast {
                    // Times so early that subtracting overflows: the expression reports it.
                    Some((Ok(times), ms))
                        if times.values().iter().all(|t| t.checked_sub(ms).is_some()) =>
                    {
                        for i in 0..times.len() {
                            advance(&mut meets, times.is_valid(i).then(|| times.value(i) - ms));
                        }
                    }
                    _ => {
                        let values = expr.evaluate(&batch.rows)?.into_array(batch.num_rows())?;
                        let millis = to_millis(&values)?;
                        for i in 0..millis.len() {
                            advance(&mut meets, millis.is_valid(i).then(|| millis.value(i)));
                        }
                    }
                }
                if let Some(l) = lane {
                    self.lanes[l].watermark = lane_watermark;
                }
                self.watermark = current;
                batch.watermarks = Some(Int64Array::from(meets));
            }
            TimeSource::Processing => {
                let now = chrono::Utc::now().timestamp_millis();
                batch.watermarks = Some(Int64Array::from(vec![self.watermark; batch.num_rows()]));
                self.watermark = self.watermark.max(now - 1);
            }
            TimeSource::None | TimeSource::Upstream => {}
        }
        Ok(batch)
    }

    /// Whether [`SourceRows::tick`] has work: processing time, or lanes that may go idle.
    pub fn ticks(&self) -> bool {
        self.processing_time() || (!self.lanes.is_empty() && self.idle_timeout().is_some())
    }

    /// Processing time moves on without rows, and so does the watermark of a source
    /// whose slowest lanes went idle.
    pub fn tick(&mut self) -> Option<Millis> {
        if !self.processing_time() {
            let min = self.active_lanes_min(None);
            return (min != Millis::MAX && min > self.watermark).then(|| {
                self.watermark = min;
                min
            });
        }
        let now = chrono::Utc::now().timestamp_millis() - 1;
        (now > self.watermark).then(|| {
            self.watermark = now;
            now
        })
    }
}

/// Milliseconds since the epoch of a timestamp (or integer millisecond) array.
pub fn to_millis(values: &ArrayRef) -> Result<Int64Array> {
    let ms = match values.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, _) | DataType::Int64 => values.clone(),
        DataType::Timestamp(_, tz) => cast(
            values,
            &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
        )?,
        other => {
            return Err(DataFusionError::Plan(format!(
                "a time attribute must be a TIMESTAMP or TIMESTAMP_LTZ, not {other}"
            )))
        }
    };
    let ms = cast(&ms, &DataType::Int64)?;
    Ok(ms
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("cast to Int64")
        .clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::TimestampMillisecondArray;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::common::DFSchema;
    use datafusion::prelude::SessionContext;

    use crate::stream::graph::{SourceKind, SourceSpec, TimeSource};

    fn watermark_expr(sql: &str, schema: &SchemaRef) -> Arc<dyn PhysicalExpr> {
        let state = SessionContext::new().state();
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).unwrap();
        let logical = state.create_logical_expr(sql, &df_schema).unwrap();
        state.create_physical_expr(logical, &df_schema).unwrap()
    }

    #[test]
    fn column_minus_fixed_interval_is_integer_subtraction() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1_436_918_400_123),
                    None,
                    Some(-5),
                    Some(0),
                ])),
            ],
        )
        .unwrap();
        for (sql, fast) in [
            ("ts - INTERVAL '4' SECOND", Some((1, 4000))),
            ("ts - INTERVAL '0.25' SECOND", Some((1, 250))),
            ("ts - INTERVAL '1' MINUTE", Some((1, 60_000))),
            ("ts - INTERVAL '1' DAY", None),
            ("ts - INTERVAL '1' MONTH", None),
            ("ts + INTERVAL '4' SECOND", None),
            ("ts", None),
        ] {
            let expr = watermark_expr(sql, &schema);
            assert_eq!(column_minus_millis(&expr, &schema), fast, "{sql}");
            if let Some((column, ms)) = fast {
                let times = to_millis(batch.column(column)).unwrap();
                let generic =
                    to_millis(&expr.evaluate(&batch).unwrap().into_array(4).unwrap()).unwrap();
                let subtracted: Int64Array = times.iter().map(|t| t.map(|t| t - ms)).collect();
                assert_eq!(subtracted, generic, "{sql}");
            }
        }
    }

    /// A source over one millisecond timestamp column `ts` with `WATERMARK FOR ts AS ts`.
    fn lanes_source(idle: Option<Duration>) -> SourceRows {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        )]));
        let spec = SourceSpec {
            kind: SourceKind::Batches(vec![]),
            computed: vec![],
            time: TimeSource::Watermark {
                expr: watermark_expr("ts - INTERVAL '0' SECOND", &schema),
                idle_timeout: idle,
            },
        };
        SourceRows::new(&spec, schema)
    }

    fn times(ts: &[i64]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        )]));
        ChangeBatch::new(
            RecordBatch::try_new(
                schema,
                vec![Arc::new(TimestampMillisecondArray::from(ts.to_vec()))],
            )
            .unwrap(),
        )
    }

    #[test]
    fn partitions_keep_their_own_watermarks_and_the_lowest_active_one_counts() {
        let mut rows = lanes_source(None);
        // Partition 0 runs ahead; partitions 1 and 2 have nothing yet and hold it back.
        let b = rows.prepare(times(&[100, 500]), Some((0, 3))).unwrap();
        assert_eq!(
            b.watermarks.unwrap().values().to_vec(),
            vec![NO_WATERMARK; 2]
        );
        assert_eq!(rows.watermark, NO_WATERMARK);
        rows.prepare(times(&[300]), Some((1, 3))).unwrap();
        assert_eq!(rows.watermark, NO_WATERMARK, "partition 2 still holds it");
        // The last partition's first row: the lowest of 500, 300 and its own rows.
        let b = rows.prepare(times(&[200, 400]), Some((2, 3))).unwrap();
        assert_eq!(
            b.watermarks.unwrap().values().to_vec(),
            vec![NO_WATERMARK, 200],
            "each row meets the watermark before it"
        );
        assert_eq!(rows.watermark, 300);
        // An old row of partition 1 does not move anything back.
        rows.prepare(times(&[50]), Some((1, 3))).unwrap();
        assert_eq!(rows.watermark, 300);
        assert_eq!(rows.tick(), None, "nothing idles without a timeout");
    }

    #[test]
    fn idle_partitions_stop_holding_the_watermark_back() {
        let mut rows = lanes_source(Some(Duration::from_millis(50)));
        rows.prepare(times(&[100]), Some((0, 2))).unwrap();
        assert_eq!(
            rows.watermark, NO_WATERMARK,
            "partition 1 may still have rows"
        );
        assert!(rows.ticks());
        std::thread::sleep(Duration::from_millis(80));
        // Both went quiet: neither counts, nothing moves.
        assert_eq!(rows.tick(), None);
        rows.prepare(times(&[700]), Some((0, 2))).unwrap();
        assert_eq!(rows.watermark, 700, "partition 1 is idle");
        // Partition 1 comes back: it holds the watermark from its own rows on.
        rows.prepare(times(&[650]), Some((1, 2))).unwrap();
        assert_eq!(rows.watermark, 700, "never back");
        std::thread::sleep(Duration::from_millis(80));
        rows.prepare(times(&[900]), Some((1, 2))).unwrap();
        assert_eq!(rows.watermark, 900, "partition 0 went idle in turn");
    }

    mod updating_view {
        use super::*;
        use crate::stream::checkpoint::store::{CheckpointMeta, Checkpoints};
        use crate::stream::message::change_lines;
        use weir_catalog::{MemoryStore, StateStore};

        fn schema() -> SchemaRef {
            Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]))
        }

        /// A durable updating view with no rows yet, its checkpoints and their store.
        fn view() -> (Arc<MvState>, Checkpoints, Arc<dyn StateStore>) {
            let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
            let log = Checkpoints::new(store.clone(), "view/v");
            let view = MvState::new(schema(), true);
            view.set_log(log.clone(), log.lineage().unwrap());
            (view, log, store)
        }

        /// Epoch `epoch` of the view's job inserts `values`: stored, then published, as
        /// its coordinator commits.
        fn commit(view: &MvState, log: &Checkpoints, epoch: Epoch, values: &[i64]) {
            let batch =
                RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(values.to_vec()))])
                    .unwrap();
            let changes = vec![ChangeBatch::new(batch)];
            let meta = CheckpointMeta {
                epoch,
                tasks: 0,
                fingerprint: String::new(),
                parallelism: vec![],
                builds_on: None,
                started_ms: 0,
                bytes: 0,
                savepoint: None,
            };
            log.write(&meta, vec![], Some(&changes), 0).unwrap();
            view.publish(changes, 0, false, epoch).unwrap();
        }

        fn reader(view: &Arc<MvState>, position: Option<&[u8]>) -> Reader {
            let mut reader = Reader::View(ViewReader {
                state: view.clone(),
                next: 0,
                watermark: NO_WATERMARK,
                bounded: false,
                changes: view.subscribe(),
                queue: Default::default(),
                feed: None,
                delivered: 0,
                skip: 0,
                followed: None,
            });
            if let Some(p) = position {
                reader.restore(p).unwrap();
            }
            reader
        }

        /// The rows the reader has now.
        fn read(reader: &mut Reader) -> Vec<String> {
            let changes: Vec<ChangeBatch> = reader
                .available_now()
                .unwrap()
                .into_iter()
                .filter_map(|r| match r {
                    Read::Rows(c) => Some(c),
                    _ => None,
                })
                .collect();
            change_lines(&changes)
        }

        fn lines(values: std::ops::RangeInclusive<i64>) -> Vec<String> {
            values.map(|v| format!("+I {v}")).collect()
        }

        #[test]
        fn a_restored_reader_reads_the_stored_changes_after_its_place_then_the_publishes() {
            let (view, log, store) = view();
            commit(&view, &log, 1, &[1]);
            commit(&view, &log, 2, &[2]);
            let mut first = reader(&view, None);
            assert_eq!(read(&mut first), lines(1..=2), "the rows as they are");
            commit(&view, &log, 3, &[3]);
            assert_eq!(read(&mut first), lines(3..=3));
            let at_3 = first.position().unwrap();
            commit(&view, &log, 4, &[4]);
            commit(&view, &log, 5, &[5]);
            let mut second = reader(&view, Some(&at_3));
            assert_eq!(read(&mut second), lines(4..=5), "stored after epoch 3");
            commit(&view, &log, 6, &[6]);
            assert_eq!(read(&mut second), lines(6..=6), "published, once");
            assert_eq!(read(&mut first), lines(4..=6));
            assert_eq!(second.position().unwrap(), first.position().unwrap());

            // A reader falling further behind than the feed holds goes on from the store.
            for e in 7..=200 {
                commit(&view, &log, e, &[e as i64]);
            }
            assert_eq!(read(&mut second), lines(7..=200));

            // A fold keeps what a registered reader needs, and only that.
            let job = Checkpoints::new(store, "job/r");
            log.register_reader(&job, 3).unwrap();
            log.compact_view(200, &[]).unwrap();
            assert_eq!(read(&mut reader(&view, Some(&at_3))), lines(4..=200));
            log.unregister_reader(&job).unwrap();
            log.compact_view(200, &[]).unwrap();
            let error = reader(&view, Some(&at_3)).available_now().err().unwrap();
            assert!(error.to_string().contains("folded"), "{error}");

            // A position of another lineage (the view was rebuilt since) is refused.
            let mut other = at_3.clone();
            other[0] ^= 1;
            let error = reader(&view, Some(&other)).available_now().err().unwrap();
            assert!(error.to_string().contains("rebuilt"), "{error}");
        }
    }
}
