//! Window aggregation over TUMBLE, HOP and CUMULATE windows (by slices) and over windows
//! given by upstream window_start/window_end columns. Emits one insert-only row per window
//! and key when the watermark reaches window_end - 1.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{Row, RowConverter, SortField};
use datafusion::common::Result;

use super::grouped::{AggregateCalls, Grouped, Partial};
use super::kept_rows::KeptRows;
use super::window_assign::millis_column;
use crate::stream::late::LateRecorder;
use crate::stream::message::{ChangeBatch, Millis, Op, NO_WATERMARK};
use crate::stream::operator::{Operator, StateReader};
use crate::stream::snapshot;
use crate::stream::source::to_millis;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::EarlyEmitMark;
use crate::stream::window::{fired, Slicing, Span};
use spill::{Held, Spill};

mod spill;

pub use spill::MERGED_IN_PARTS;

/// The group key columns of output rows, in key order.
pub fn output_keys(output: &[OutputColumn], columns: &[ArrayRef]) -> Vec<ArrayRef> {
    let mut keys: Vec<(usize, ArrayRef)> = output
        .iter()
        .zip(columns)
        .filter_map(|(o, c)| match o {
            OutputColumn::Key(k) => Some((*k, c.clone())),
            _ => None,
        })
        .collect();
    keys.sort_by_key(|(k, _)| *k);
    keys.into_iter().map(|(_, c)| c).collect()
}

/// Where each output column comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputColumn {
    WindowStart,
    WindowEnd,
    WindowTime,
    Key(usize),
    Aggregate(usize),
}

#[derive(Default)]
struct Slice {
    live: Option<Grouped>,
    /// Frozen states, never changed once made: a snapshot of changes holds those after
    /// the first `snapshotted` (under the sled backend, some of those before may be on
    /// disk).
    partials: Vec<Held>,
    snapshotted: usize,
}

impl Slice {
    fn size(&self) -> usize {
        self.live.as_ref().map(|g| g.size()).unwrap_or(0)
            + self.partials.iter().map(Held::memory_size).sum::<usize>()
    }
}

pub struct WindowAggregate {
    pub calls: Arc<AggregateCalls>,
    pub slicing: Slicing,
    /// Input columns holding each row's slice (or window) bounds.
    pub start_column: usize,
    pub end_column: usize,
    pub output: Vec<OutputColumn>,
    pub schema: SchemaRef,
    slices: BTreeMap<Span, Slice>,
    watermark: Millis,
    late: u64,
    /// 'table.exec.emit.allow-lateness': fired windows stay this long, and rows arriving
    /// for them re-emit the window's rows as -U (old) and +U (corrected).
    pub lateness: Millis,
    /// What fired windows emitted, while they can still be corrected.
    emitted: BTreeMap<Span, KeptRows>,
    /// Fired windows that late rows changed since the last watermark.
    dirty: BTreeSet<Span>,
    /// Windows whose emitted rows changed since the previous snapshot.
    emitted_changed: BTreeSet<Span>,
    /// Where dropped rows go, if the session named a late-data table.
    pub late_rows: Option<LateRecorder>,
    /// Under the sled backend: where frozen slice states beyond the budget go.
    spill: Option<Spill>,
    /// Under the backend: state in memory past this mark between snapshots goes to disk
    /// then (live slice states frozen first).
    early: Option<EarlyEmitMark>,
    /// Partial states that went to disk before a snapshot wrote them, listed by the last
    /// snapshot of changes for its reader.
    unsnapshotted_on_disk: Vec<Stored>,
    /// Windows merged in parts.
    #[cfg(test)]
    merged_in_parts: usize,
    /// Emitted rows a correction read back from disk.
    #[cfg(test)]
    emitted_read_back: usize,
}

impl WindowAggregate {
    pub fn new(
        calls: Arc<AggregateCalls>,
        slicing: Slicing,
        (start_column, end_column): (usize, usize),
        output: Vec<OutputColumn>,
        schema: SchemaRef,
    ) -> Self {
        Self {
            calls,
            slicing,
            start_column,
            end_column,
            output,
            schema,
            slices: BTreeMap::new(),
            watermark: NO_WATERMARK,
            late: 0,
            late_rows: None,
            lateness: 0,
            emitted: BTreeMap::new(),
            dirty: BTreeSet::new(),
            emitted_changed: BTreeSet::new(),
            spill: None,
            early: None,
            unsnapshotted_on_disk: Vec::new(),
            #[cfg(test)]
            merged_in_parts: 0,
            #[cfg(test)]
            emitted_read_back: 0,
        }
    }

    fn add(&mut self, slice: Span, rows: &RecordBatch) -> Result<()> {
        let keys = self.calls.key_columns(rows)?;
        let entry = self.slices.entry(slice).or_default();
        let live = match &mut entry.live {
            Some(live) => live,
            None => entry.live.insert(self.calls.new_state()?),
        };
        live.update(&self.calls, &keys, rows)
    }

    fn fire(&mut self, window: Span, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if let Some(parts) = self.parts_on_disk(window)? {
            let mut fired = Vec::new();
            for part in parts.into_iter().filter(|p| !p.is_empty()) {
                let mut state = self.merge_part(part)?;
                if let Some(rows) = self.window_rows(window, &mut state)? {
                    match self.lateness {
                        0 => out.push(ChangeBatch::new(rows)),
                        _ => fired.push(rows),
                    }
                }
            }
            if !fired.is_empty() {
                let rows = concat_batches(&self.schema, &fired)?;
                self.emit_correctable(window, rows, out)?;
            }
            return Ok(());
        }
        let slices = self.slicing.slices_of_window(window);
        // A slice no later window needs is consumed in place.
        let mut state: Option<Grouped> = None;
        for slice in slices {
            let last = self.slicing.last_end(slice) == window.1;
            let Some(entry) = self.slices.get_mut(&slice) else {
                continue;
            };
            if last && self.lateness == 0 && state.is_none() && entry.partials.is_empty() {
                if let Some(live) = self.slices.remove(&slice).and_then(|s| s.live) {
                    state = Some(live);
                }
                continue;
            }
            if let Some(mut live) = entry.live.take() {
                if !live.is_empty() {
                    entry.partials.push(Held::Memory(live.freeze()?));
                }
            }
            let target = match &mut state {
                Some(s) => s,
                None => state.insert(self.calls.new_state()?),
            };
            for held in &entry.partials {
                match held {
                    Held::Memory(partial) => target.merge(partial)?,
                    Held::Disk(stored) => {
                        let spill = self.spill.as_ref().expect("on disk under the backend");
                        target.merge(&spill.read(&self.calls, *stored)?)?;
                    }
                }
            }
        }
        let Some(mut state) = state else {
            return Ok(());
        };
        let Some(rows) = self.window_rows(window, &mut state)? else {
            return Ok(());
        };
        if self.lateness == 0 {
            out.push(ChangeBatch::new(rows));
            Ok(())
        } else {
            self.emit_correctable(window, rows, out)
        }
    }

    /// `window`'s output rows of merged state `state`; `None` when it has none.
    fn window_rows(&self, window: Span, state: &mut Grouped) -> Result<Option<RecordBatch>> {
        let (keys, values) = state.evaluate()?;
        let rows = keys
            .first()
            .map(|k| k.len())
            .or(values.first().map(|v| v.len()))
            .unwrap_or(0);
        if rows == 0 {
            return Ok(None);
        }
        let columns = self
            .output
            .iter()
            .enumerate()
            .map(|(i, column)| -> Result<ArrayRef> {
                Ok(match *column {
                    OutputColumn::WindowStart => {
                        millis_column(vec![window.0; rows], &self.schema, i)?
                    }
                    OutputColumn::WindowEnd => {
                        millis_column(vec![window.1; rows], &self.schema, i)?
                    }
                    OutputColumn::WindowTime => {
                        millis_column(vec![window.1 - 1; rows], &self.schema, i)?
                    }
                    OutputColumn::Key(k) => cast_to(&keys[k], &self.schema, i)?,
                    OutputColumn::Aggregate(a) => cast_to(&values[a], &self.schema, i)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(RecordBatch::try_new(self.schema.clone(), columns)?))
    }

    /// Emits `rows` of `window` under an allowed lateness: kept, and a window that fired
    /// before takes its earlier rows back.
    fn emit_correctable(
        &mut self,
        window: Span,
        rows: RecordBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        self.emitted_changed.insert(window);
        match self
            .emitted
            .insert(window, KeptRows::Memory(vec![rows.clone()]))
        {
            Some(old) => {
                let old = self.take_emitted(old)?;
                out.push(ChangeBatch::with_op(old, Op::UpdateBefore));
                out.push(ChangeBatch::with_op(rows, Op::UpdateAfter));
            }
            None => out.push(ChangeBatch::new(rows)),
        }
        Ok(())
    }

    /// Drops the slices no window open at `watermark` needs and the emitted rows of
    /// windows past their lateness.
    fn drop_passed(&mut self, watermark: Millis) -> Result<()> {
        let (slicing, lateness) = (&self.slicing, self.lateness);
        let passed: Vec<Span> = self
            .slices
            .keys()
            .filter(|slice| fired(slicing.last_end(**slice) + lateness, watermark))
            .copied()
            .collect();
        for slice in passed {
            let gone = self.slices.remove(&slice).expect("listed");
            if let Some(spill) = self.spill.as_mut() {
                spill::remove(spill, &gone.partials)?;
            }
        }
        let expired: Vec<Span> = self
            .emitted
            .keys()
            .filter(|window| fired(window.1 + lateness, watermark))
            .copied()
            .collect();
        for window in expired {
            if let Some(rows) = self.emitted.remove(&window) {
                rows.forget(self.spill.as_mut())?;
            }
        }
        let emitted = &self.emitted;
        self.emitted_changed.retain(|w| emitted.contains_key(w));
        Ok(())
    }

    /// The state, whole or as what changed since the previous snapshot: the partial
    /// states frozen since (a slice's live state is frozen first), and the emitted rows
    /// of windows that fired or were corrected since. Slices and windows dropped since
    /// are not named: a restore drops them again by its watermark ([`Operator::restored`]).
    fn snapshot_of(&mut self, whole: bool) -> Result<Vec<RecordBatch>> {
        let mut out = vec![snapshot::progress(self.watermark, self.late)?];
        for (slice, entry) in &mut self.slices {
            if let Some(mut live) = entry.live.take() {
                if !live.is_empty() {
                    entry.partials.push(Held::Memory(live.freeze()?));
                }
            }
            let from = if whole { 0 } else { entry.snapshotted };
            // Those on disk are read off the task (`spilled_snapshot`).
            for held in &entry.partials[from..] {
                match held {
                    Held::Memory(partial) => out.push(snapshot::batch(
                        "slice",
                        &[slice.0, slice.1],
                        partial.columns(),
                    )?),
                    Held::Disk(stored) if !whole => self.unsnapshotted_on_disk.push(*stored),
                    Held::Disk(_) => {}
                }
            }
            entry.snapshotted = entry.partials.len();
        }
        let changed = std::mem::take(&mut self.emitted_changed);
        for (window, emitted) in &self.emitted {
            // Rows on disk are unchanged since they went (a correction brings them back);
            // a whole snapshot reads them off the task.
            let Some(rows) = emitted.in_memory() else {
                continue;
            };
            if whole || changed.contains(window) {
                for rows in rows {
                    out.push(snapshot::batch(
                        "emitted",
                        &[window.0, window.1],
                        rows.columns().to_vec(),
                    )?);
                }
            }
        }
        Ok(out)
    }

    /// A window's emitted rows `earlier` with those of `newer` in place of the rows of
    /// the same keys: a later snapshot's rows of a window replace its earlier ones, and
    /// a rescaled subtask gets a window's rows of other keys from other old subtasks.
    fn upsert(&self, earlier: &RecordBatch, newer: RecordBatch) -> Result<RecordBatch> {
        let keys_of = |b: &RecordBatch| output_keys(&self.output, b.columns());
        let (old_keys, new_keys) = (keys_of(earlier), keys_of(&newer));
        let fields = new_keys
            .iter()
            .map(|k| SortField::new(k.data_type().clone()))
            .collect();
        let converter = RowConverter::new(fields)?;
        let replaced = converter.convert_columns(&new_keys)?;
        let replaced: HashSet<Row> = replaced.iter().collect();
        let old = converter.convert_columns(&old_keys)?;
        let kept = BooleanArray::from_iter(old.iter().map(|k| Some(!replaced.contains(&k))));
        let kept = filter_record_batch(earlier, &kept)?;
        Ok(concat_batches(&self.schema, [&kept, &newer])?)
    }

    fn add_rows(&mut self, batch: ChangeBatch) -> Result<()> {
        let starts = to_millis(batch.rows.column(self.start_column))?;
        let ends = to_millis(batch.rows.column(self.end_column))?;
        // Rows of a batch fall into a few slices, usually one, and come in runs: a short
        // list searched from the last slice used beats hashing every row.
        let mut by_slice: Vec<(Span, Vec<u32>)> = Vec::new();
        let mut last = 0;
        let mut kept = 0usize;
        let (mut late, mut late_watermarks) = (Vec::new(), Vec::new());
        for i in 0..batch.num_rows() {
            let slice = (starts.value(i), ends.value(i));
            let last_end = self.slicing.last_end(slice);
            let watermark = batch.watermark_of(i, self.watermark);
            if fired(last_end + self.lateness, watermark) {
                self.late += 1;
                late.push(i as u32);
                late_watermarks.push(watermark);
                continue;
            }
            kept += 1;
            if self.lateness > 0 && fired(last_end, self.watermark) {
                for window in self.slicing.windows_of_slice(slice) {
                    if fired(window.1, self.watermark) {
                        self.dirty.insert(window);
                    }
                }
            }
            if by_slice.get(last).is_none_or(|(s, _)| *s != slice) {
                last = match by_slice.iter().position(|(s, _)| *s == slice) {
                    Some(p) => p,
                    None => {
                        by_slice.push((slice, Vec::new()));
                        by_slice.len() - 1
                    }
                };
            }
            by_slice[last].1.push(i as u32);
        }
        if let Some(sink) = &mut self.late_rows {
            sink.record("WindowAggregate", &batch.rows, late, late_watermarks)?;
        }
        if kept == batch.num_rows() && by_slice.len() == 1 {
            let (slice, _) = by_slice.pop().expect("one slice");
            return self.add(slice, &batch.rows);
        }
        for (slice, rows) in by_slice {
            let part = take_record_batch(&batch.rows, &UInt32Array::from(rows))?;
            self.add(slice, &part)?;
        }
        Ok(())
    }
}

fn cast_to(array: &ArrayRef, schema: &SchemaRef, i: usize) -> Result<ArrayRef> {
    let ty = schema.field(i).data_type();
    if array.data_type() == ty {
        Ok(array.clone())
    } else {
        Ok(datafusion::arrow::compute::cast(array, ty)?)
    }
}

impl Operator for WindowAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        self.add_rows(batch)?;
        // Late rows within the allowed lateness correct their windows at once, as Flink
        // fires a window again for each late element.
        for window in std::mem::take(&mut self.dirty) {
            self.fire(window, out)?;
        }
        self.move_out_early()
    }

    fn on_watermark(&mut self, watermark: Millis, out: &mut Vec<ChangeBatch>) -> Result<()> {
        let mut due = BTreeSet::new();
        for slice in self.slices.keys() {
            for window in self.slicing.windows_of_slice(*slice) {
                if fired(window.1, watermark) && !fired(window.1, self.watermark) {
                    due.insert((window.1, window.0));
                }
            }
        }
        for (end, start) in due {
            self.fire((start, end), out)?;
        }
        for window in std::mem::take(&mut self.dirty) {
            self.fire(window, out)?;
        }
        self.drop_passed(watermark)?;
        self.watermark = watermark;
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.spill.as_ref().map_or(0, |s| s.files.bytes())
            + self.slices.values().map(Slice::size).sum::<usize>()
            + self
                .emitted
                .values()
                .map(KeptRows::memory_size)
                .sum::<usize>()
    }

    fn late_rows_dropped(&self) -> u64 {
        self.late
    }

    fn take_late_rows(&mut self) -> Vec<RecordBatch> {
        self.late_rows
            .as_mut()
            .map(LateRecorder::take)
            .unwrap_or_default()
    }

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.snapshot_of(true)
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        self.snapshot_of(false).map(Some)
    }

    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        self.spilled_snapshot(whole)
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let (kind, _, columns) = snapshot::parts(batch, 2)?;
        Ok(Some(match kind.as_str() {
            "slice" => columns[..self.calls.key_schema.fields().len()].to_vec(),
            _ => output_keys(&self.output, &columns),
        }))
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        for batch in state {
            let (kind, head, columns) = snapshot::parts(&batch, 2)?;
            match kind.as_str() {
                "progress" => {
                    (self.watermark, self.late) = snapshot::read_progress(&head);
                }
                "slice" => {
                    let partial = Partial::from_columns(&self.calls, &columns)?;
                    self.slices
                        .entry((head[0], head[1]))
                        .or_default()
                        .partials
                        .push(Held::Memory(partial));
                }
                "emitted" => {
                    let rows = RecordBatch::try_new(self.schema.clone(), columns)?;
                    let window = (head[0], head[1]);
                    let rows = match self.emitted.remove(&window) {
                        Some(earlier) => {
                            let earlier = self.take_emitted(earlier)?;
                            self.upsert(&earlier, rows)?
                        }
                        None => rows,
                    };
                    self.emitted.insert(window, KeptRows::Memory(vec![rows]));
                }
                other => {
                    return Err(datafusion::common::DataFusionError::Internal(format!(
                        "window aggregate state of unknown kind {other}"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The slices and emitted windows of a whole snapshot and the changes after it that
    /// the restored watermark had dropped go, as they went then.
    fn restored(&mut self) -> Result<()> {
        self.drop_passed(self.watermark)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::plan::window_tvf::WindowKind;
    use crate::stream::operator::testing::{restores_from_incremental_snapshots, Step};
    use crate::stream::state_backend::SledBackend;

    /// Rows (k, v, window_start, window_end).
    pub(crate) fn input_schema() -> SchemaRef {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
            Field::new("window_start", ts.clone(), false),
            Field::new("window_end", ts, false),
        ]))
    }

    fn operator() -> WindowAggregate {
        let schema = input_schema();
        let key = col("k", &schema).unwrap();
        let v = col("v", &schema).unwrap();
        let sum = AggregateExprBuilder::new(sum_udaf(), vec![v.clone()])
            .schema(schema.clone())
            .alias("sum")
            .build()
            .unwrap();
        let count = AggregateExprBuilder::new(count_udaf(), vec![v])
            .schema(schema.clone())
            .alias("count")
            .distinct()
            .build()
            .unwrap();
        let calls = Arc::new(AggregateCalls {
            keys: vec![key],
            key_schema: Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)])),
            aggregates: vec![Arc::new(sum), Arc::new(count)],
            filters: vec![None, None],
        });
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let output = Arc::new(Schema::new(vec![
            Field::new("window_start", ts, false),
            Field::new("k", DataType::Int64, false),
            Field::new("sum", DataType::Int64, true),
            Field::new("count", DataType::Int64, false),
        ]));
        WindowAggregate::new(
            calls,
            Slicing::new(&WindowKind::Hop {
                slide: 10,
                size: 30,
                offset: 0,
            }),
            (2, 3),
            vec![
                OutputColumn::WindowStart,
                OutputColumn::Key(0),
                OutputColumn::Aggregate(0),
                OutputColumn::Aggregate(1),
            ],
            output,
        )
    }

    /// Rows (k, v, t) in windows (slices) of 10: the input of a window operator.
    pub(crate) fn rows(rows: &[(i64, i64, i64)]) -> ChangeBatch {
        let slice = |t: i64| t - t.rem_euclid(10);
        ChangeBatch::new(
            RecordBatch::try_new(
                input_schema(),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| slice(r.2)),
                    )),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| slice(r.2) + 10),
                    )),
                ],
            )
            .unwrap(),
        )
    }

    fn run(op: &mut WindowAggregate, batches: &[ChangeBatch], watermark: Millis) -> Vec<String> {
        let mut out = Vec::new();
        for b in batches {
            op.process(0, b.clone(), &mut out).unwrap();
        }
        op.on_watermark(watermark, &mut out).unwrap();
        let mut lines: Vec<String> = out
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(move |i| {
                    (0..b.rows.num_columns())
                        .map(|c| {
                            datafusion::arrow::util::display::array_value_to_string(
                                b.rows.column(c),
                                i,
                            )
                            .unwrap()
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
            })
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn a_restored_aggregate_continues_as_if_never_stopped() {
        let first = [
            rows(&[(1, 5, 1), (2, 7, 12), (1, 5, 25)]),
            rows(&[(1, 9, 14)]),
        ];
        let second = [rows(&[(1, 1, 31), (2, 2, 33)])];
        let mut straight = operator();
        let mut expected = run(&mut straight, &first, 15);
        expected.extend(run(&mut straight, &second, 100));

        let mut before = operator();
        let mut got = run(&mut before, &first, 15);
        let state = before.snapshot().unwrap();
        let mut after = operator();
        after.restore(state).unwrap();
        got.extend(run(&mut after, &second, 100));
        assert_eq!(got, expected);
        assert!(
            expected.contains(&"1970-01-01T00:00:00,1,19,2".to_string()),
            "{expected:?}"
        );
    }

    /// Steps of input and watermark: out-of-order rows, windows firing and slices
    /// dropped, and rows later than the watermark (late within the lateness, or dropped).
    fn steps() -> Vec<Step> {
        vec![
            (rows(&[(1, 5, 1), (2, 7, 12), (1, 5, 25)]), 5),
            (rows(&[(1, 9, 14), (3, 1, 8)]), 15),
            (rows(&[(2, 2, 33), (1, 1, 31)]), 29),
            (rows(&[(1, 4, 27), (2, 3, 41)]), 40),
            (rows(&[(3, 6, 2), (2, 8, 45)]), 52),
            (rows(&[(1, 2, 55), (1, 3, 38)]), 70),
            (rows(&[(2, 1, 75)]), 200),
        ]
    }

    #[test]
    fn incremental_snapshots_restore_what_a_whole_one_would() {
        for lateness in [0, 25] {
            let fresh = || {
                let mut op = operator();
                op.lateness = lateness;
                op
            };
            restores_from_incremental_snapshots(fresh, &steps(), lateness > 0, |op| {
                (op.slices.len(), op.emitted.len())
            });
        }
    }

    /// Slice states read back from a checkpoint share its messages' buffers: they count
    /// what they hold, as before the checkpoint.
    #[test]
    fn restored_slice_states_count_their_own_bytes() {
        use crate::stream::checkpoint::frame::{FrameReader, FrameWriter};
        let mut op = operator();
        let many: Vec<(i64, i64, i64)> = (0..5_000).map(|k| (k, k, 1)).collect();
        run(&mut op, &[rows(&many)], 0);
        let state = op.snapshot().unwrap();
        let before = op.state_size();
        let read: Vec<RecordBatch> = state
            .iter()
            .map(|b| {
                let mut w = FrameWriter::default();
                w.batch(b).unwrap();
                FrameReader::new(&w.bytes).batch().unwrap()
            })
            .collect();
        let mut restored = operator();
        restored.restore(read).unwrap();
        restored.restored().unwrap();
        let after = restored.state_size();
        assert!(after <= before * 5 / 4, "{after} against {before}");
    }

    /// Under the sled backend with no memory for them, every snapshot moves the frozen
    /// slice states out: windows read them back when they fire, whole snapshots read
    /// them off the task, and what is dropped leaves the disk. Output and restores are
    /// those of the operator in memory.
    #[test]
    fn frozen_slice_states_on_disk_give_the_same_windows_and_restores() {
        use crate::stream::operator::testing::{backend_without_memory, run_step, snapshot_of};
        let (_dir, backend) = backend_without_memory();
        // With `early`, state goes to disk after every batch too, before snapshots.
        for (lateness, early) in [(0, false), (25, false), (0, true), (25, true)] {
            let fresh = || {
                let mut op = operator().with_backend(Some(&backend)).unwrap();
                op.lateness = lateness;
                if early {
                    op.early = Some(EarlyEmitMark::with_slack(0, 0));
                }
                op
            };
            let mut memory = operator();
            memory.lateness = lateness;
            let mut disk = fresh();
            let (mut went, mut emitted_went, mut went_early) = (0, false, false);
            for (i, step) in steps().iter().enumerate() {
                assert_eq!(run_step(&mut disk, step), run_step(&mut memory, step));
                went_early |= disk.slices.values().any(|s| {
                    s.partials[s.snapshotted..]
                        .iter()
                        .any(|h| matches!(h, Held::Disk(_)))
                });
                let whole = snapshot_of(&mut disk, i == 0);
                if i == 0 {
                    assert_eq!(whole.len(), snapshot_of(&mut memory, true).len());
                }
                let on_disk = disk.spill.as_ref().expect("backend").files.bytes();
                went += (on_disk > 0) as usize;
                emitted_went |= disk
                    .emitted
                    .values()
                    .any(|e| matches!(e, KeptRows::Disk(_)));
                assert_eq!(disk.state_size() > 0, memory.state_size() > 0, "step {i}");
            }
            assert!(went >= 3, "state went to disk after {went} steps");
            assert!(disk.merged_in_parts > 0, "no window was merged in parts");
            if lateness > 0 {
                assert!(emitted_went, "no window's emitted rows went to disk");
                assert!(disk.emitted_read_back > 0, "no correction read rows back");
            }
            assert_eq!(went_early, early, "states went to disk before a snapshot");
            assert_eq!(disk.spill.as_ref().unwrap().files.bytes(), 0, "all dropped");
            restores_from_incremental_snapshots(fresh, &steps(), lateness > 0, |op| {
                let partials = op.slices.values().map(|s| s.partials.len()).sum::<usize>();
                (op.slices.len(), op.emitted.len(), partials)
            });
        }
    }

    /// Under an allowed lateness, with no memory for them, the rows fired windows
    /// emitted go to disk at every snapshot; late rows correct them from there, whole
    /// snapshots read them off the task, and a restore from such a snapshot runs on as
    /// the operator in memory.
    #[test]
    fn emitted_rows_on_disk_are_corrected_and_snapshotted_whole() {
        use crate::stream::operator::testing::{backend_without_memory, run_step, snapshot_of};
        let (_dir, backend) = backend_without_memory();
        let fresh = || {
            let mut op = operator().with_backend(Some(&backend)).unwrap();
            op.lateness = 25;
            op
        };
        let emitted_lines = |batches: &[RecordBatch]| {
            let mut lines: Vec<String> = batches
                .iter()
                .filter(|b| snapshot::parts(b, 2).unwrap().0 == "emitted")
                .flat_map(|b| crate::stream::message::change_lines(&[ChangeBatch::new(b.clone())]))
                .collect();
            lines.sort();
            lines
        };
        let steps = steps();
        let mut memory = operator();
        memory.lateness = 25;
        let expected: Vec<Vec<String>> = steps.iter().map(|s| run_step(&mut memory, s)).collect();
        for k in 1..steps.len() {
            let (mut disk, mut memory) = (fresh(), operator());
            memory.lateness = 25;
            for step in &steps[..k] {
                run_step(&mut disk, step);
                run_step(&mut memory, step);
                let whole = snapshot_of(&mut disk, true);
                assert_eq!(
                    emitted_lines(&whole),
                    emitted_lines(&snapshot_of(&mut memory, true))
                );
            }
            let whole = snapshot_of(&mut disk, true);
            let mut restored = fresh();
            restored.restore(whole).unwrap();
            restored.restored().unwrap();
            for (i, step) in steps.iter().enumerate().skip(k) {
                assert_eq!(
                    run_step(&mut restored, step),
                    expected[i],
                    "after step {k}, step {i}"
                );
            }
        }
    }

    /// A window whose partial states take more than 16 times the budget fires in parts
    /// of its keys, a batch each; together they are the rows the operator in memory
    /// gives, and the parts leave nothing on disk.
    #[test]
    fn a_window_beyond_its_budget_fires_in_parts_of_its_keys() {
        use crate::stream::operator::testing::snapshot_of;
        const KEYS: i64 = 3000;
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend {
            root: dir.path().to_path_buf(),
            memory: 2048,
        };
        let mut disk = operator().with_backend(Some(&backend)).unwrap();
        let mut memory = operator();
        // Each key in two slices, and twice in the first across a checkpoint.
        let early: Vec<(i64, i64, i64)> = (0..KEYS).map(|k| (k, k, 1)).collect();
        let again: Vec<(i64, i64, i64)> = (0..KEYS).map(|k| (k, 1, 5)).collect();
        let later: Vec<(i64, i64, i64)> = (0..KEYS).step_by(2).map(|k| (k, 3, 12)).collect();
        let mut outputs = Vec::new();
        for op in [&mut disk, &mut memory] {
            let mut out = Vec::new();
            op.process(0, rows(&early), &mut out).unwrap();
            snapshot_of(op, true);
            op.process(0, rows(&again), &mut out).unwrap();
            snapshot_of(op, false);
            op.process(0, rows(&later), &mut out).unwrap();
            op.on_watermark(20, &mut out).unwrap();
            outputs.push(out);
        }
        let (parts, whole) = (&outputs[0], &outputs[1]);
        assert_eq!(
            disk.merged_in_parts, 2,
            "both windows ending by 20 fired in parts"
        );
        let lines = |out: &[ChangeBatch]| {
            let mut lines = crate::stream::message::change_lines(out);
            lines.sort();
            lines
        };
        assert_eq!(lines(parts), lines(whole));
        assert_eq!(lines(whole).len(), 2 * KEYS as usize);
        let largest = parts.iter().map(ChangeBatch::num_rows).max().unwrap();
        assert!(largest < KEYS as usize / 4, "a part of {largest} rows");
        // What is left on disk is the slices' frozen states later windows need.
        let slices_on_disk: usize = disk
            .slices
            .values()
            .flat_map(|s| &s.partials)
            .map(|held| match held {
                Held::Disk(stored) => stored.bytes,
                Held::Memory(_) => 0,
            })
            .sum();
        let on_disk = disk.spill.as_ref().unwrap().files.bytes();
        assert_eq!(on_disk, slices_on_disk, "the parts were removed");
    }

    #[test]
    fn a_windows_emitted_rows_of_a_later_snapshot_replace_those_of_its_keys() {
        let mut op = operator();
        op.lateness = 100;
        run(&mut op, &[rows(&[(1, 5, 1), (2, 7, 2)])], 40);
        let whole = op.snapshot().unwrap();
        // A late row corrects key 1's row of the windows holding slice 0.
        run(&mut op, &[rows(&[(1, 1, 3)])], 40);
        let changes = op.snapshot_changes().unwrap().unwrap();
        let mut restored = operator();
        restored.lateness = 100;
        restored.restore(whole).unwrap();
        restored.restore(changes).unwrap();
        restored.restored().unwrap();
        let in_memory = |e: &KeptRows| match e {
            KeptRows::Memory(rows) => concat_batches(&rows[0].schema(), rows).unwrap(),
            KeptRows::Disk(_) => panic!("no backend"),
        };
        for (window, rows) in &op.emitted {
            let (got, rows) = (&in_memory(&restored.emitted[window]), &in_memory(rows));
            let lines = |b: &RecordBatch| {
                let mut l: Vec<String> = (0..b.num_rows())
                    .map(|i| {
                        (0..b.num_columns())
                            .map(|c| {
                                datafusion::arrow::util::display::array_value_to_string(
                                    b.column(c),
                                    i,
                                )
                                .unwrap()
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect();
                l.sort();
                l
            };
            assert_eq!(lines(got), lines(rows), "window {window:?}");
            assert_eq!(got.num_rows(), 2);
        }
        assert_eq!(restored.emitted.len(), 3);
        // Rescaled: another old subtask's rows of the same windows (other keys) join them.
        let mut other = operator();
        other.lateness = 100;
        run(&mut other, &[rows(&[(3, 4, 5)])], 40);
        restored.restore(other.snapshot().unwrap()).unwrap();
        restored.restored().unwrap();
        assert!(restored
            .emitted
            .values()
            .all(|rows| in_memory(rows).num_rows() == 3));
    }
}
