//! A piece of the logical plan run by DataFusion over buffered rows: per window (window
//! TopN, window join, window deduplication) when the watermark closes the window, or
//! once at the end of a bounded input (ORDER BY, LIMIT, joins and aggregates of a SELECT
//! over bounded inputs).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DFSchemaRef, Result};
use datafusion::datasource::{provider_as_source, MemTable};
use datafusion::execution::SessionState;
use datafusion::logical_expr::{col, Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::collect;
use datafusion::physical_planner::{DefaultPhysicalPlanner, PhysicalPlanner};

use crate::stream::late::LateRecorder;
use crate::stream::message::{ChangeBatch, Millis, Op, NO_WATERMARK};
use crate::stream::operator::{Operator, StateReader};
use crate::stream::snapshot;
use crate::stream::source::to_millis;
use crate::stream::state_backend::batches::Stored;
use crate::stream::state_backend::EarlyEmitMark;
use crate::stream::window::{fired, Span};

mod spill;

use super::kept_rows::KeptRows;
use spill::{Buffered, Spill};

/// The whole input, when the fragment is not per window.
const EVERYTHING: Span = (Millis::MIN, Millis::MAX);

pub struct Fragment {
    state: SessionState,
    /// The plan node to run; its inputs are replaced by the buffered rows.
    node: LogicalPlan,
    inputs: Vec<DFSchemaRef>,
    /// Per input, the columns holding window_start and window_end; `None`: run at the end.
    windows: Option<Vec<(usize, usize)>>,
    schema: SchemaRef,
    buffers: BTreeMap<Span, Vec<Vec<Buffered>>>,
    watermark: Millis,
    late: u64,
    /// Where dropped rows go, if the session named a late-data table.
    pub late_rows: Option<LateRecorder>,
    /// 'table.exec.emit.allow-lateness': how long fired windows are kept for corrections.
    pub lateness: Millis,
    /// What fired windows emitted, while they can still be corrected.
    emitted: BTreeMap<Span, KeptRows>,
    /// Fired windows that late rows changed.
    dirty: std::collections::BTreeSet<Span>,
    /// Per window and input, how many buffered batches a snapshot holds already: a
    /// snapshot of changes holds those after.
    snapshotted: BTreeMap<Span, Vec<usize>>,
    /// Windows whose emitted rows changed since the previous snapshot.
    emitted_changed: std::collections::BTreeSet<Span>,
    /// Snapshots taken, numbering them within a chain of snapshots.
    snapshots: i64,
    /// While restoring: the snapshot each window's emitted rows came from.
    restored_from: BTreeMap<Span, i64>,
    /// Under the sled backend: where buffered rows beyond the budget go.
    spill: Option<Spill>,
    /// Under the backend: rows in memory past this mark between snapshots go to disk
    /// then.
    early: Option<EarlyEmitMark>,
    /// Batches that went to disk before a snapshot wrote them, listed by the last
    /// snapshot of changes for its reader.
    unsnapshotted_on_disk: Vec<Stored>,
}

/// Kinds of state batches of a snapshot of changes: a window's emitted rows (or that it
/// fired and emitted none), each with the snapshot's number, replacing what earlier
/// snapshots held for the window.
const EMITTED_CHANGED: &str = "emitted-changed";
const FIRED_CHANGED: &str = "fired-changed";

impl Fragment {
    pub fn new(
        state: SessionState,
        node: LogicalPlan,
        windows: Option<Vec<(usize, usize)>>,
        schema: SchemaRef,
    ) -> Self {
        let inputs = node.inputs().iter().map(|i| i.schema().clone()).collect();
        // One partition: the rows of a window are few, and no DataFusion task is spawned.
        let mut state = state;
        state.config_mut().options_mut().execution.target_partitions = 1;
        Self {
            state,
            node,
            inputs,
            windows,
            schema,
            buffers: BTreeMap::new(),
            watermark: NO_WATERMARK,
            late: 0,
            late_rows: None,
            lateness: 0,
            emitted: BTreeMap::new(),
            dirty: Default::default(),
            snapshotted: BTreeMap::new(),
            emitted_changed: Default::default(),
            snapshots: 0,
            restored_from: BTreeMap::new(),
            spill: None,
            early: None,
            unsnapshotted_on_disk: Vec::new(),
        }
    }

    fn buffer(&mut self, span: Span, input: usize, rows: ChangeBatch) {
        let n = self.inputs.len();
        self.buffers
            .entry(span)
            .or_insert_with(|| vec![Vec::new(); n])[input]
            .push(Buffered::Memory(Box::new(rows)));
    }

    /// Bytes of buffered rows held in memory.
    fn buffered_in_memory(&self) -> usize {
        self.buffers
            .values()
            .flatten()
            .flatten()
            .map(Buffered::memory_size)
            .sum()
    }

    /// A `rows` state batch: its window, input and rows (with their ops).
    fn decode_rows(&self, batch: &RecordBatch) -> Result<(Span, usize, ChangeBatch)> {
        let (_, head, mut columns) = snapshot::parts(batch, 4)?;
        let input = head[2] as usize;
        let ops = if head[3] == 1 {
            columns.pop().and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::Int8Array>()
                    .cloned()
            })
        } else {
            None
        };
        let schema = Arc::new(self.inputs[input].as_arrow().clone());
        let rows = crate::stream::batch_of(schema, columns, batch.num_rows())?;
        let change = ChangeBatch {
            rows,
            watermarks: None,
            ops,
        };
        Ok(((head[0], head[1]), input, change))
    }

    /// Runs the node over one window's rows.
    fn run(&self, rows: Vec<Vec<ChangeBatch>>) -> Result<Vec<RecordBatch>> {
        let mut inputs = Vec::new();
        for (i, (changes, schema)) in rows.into_iter().zip(&self.inputs).enumerate() {
            let arrow = Arc::new(schema.as_arrow().clone());
            // An input whose rows were corrected (allow-lateness) is its net rows here.
            let batches = crate::stream::changelog::apply(&arrow, vec![], changes)?;
            // Buffered columns get plain names; a projection gives back the qualified ones
            // the node's expressions refer to.
            let plain: Vec<_> = (0..arrow.fields().len()).map(|c| format!("c{c}")).collect();
            let plain_schema = Arc::new(datafusion::arrow::datatypes::Schema::new(
                arrow
                    .fields()
                    .iter()
                    .zip(&plain)
                    .map(|(f, n)| f.as_ref().clone().with_name(n))
                    .collect::<Vec<_>>(),
            ));
            let batches = batches
                .into_iter()
                .map(|b| {
                    crate::stream::batch_of(
                        plain_schema.clone(),
                        b.columns().to_vec(),
                        b.num_rows(),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let table = MemTable::try_new(plain_schema, vec![batches])?;
            let exprs: Vec<Expr> = schema
                .iter()
                .zip(&plain)
                .map(|((qualifier, field), name)| {
                    col(name.as_str()).alias_qualified(qualifier.cloned(), field.name())
                })
                .collect();
            let scan = LogicalPlanBuilder::scan(
                format!("__buffer{i}"),
                provider_as_source(Arc::new(table)),
                None,
            )?
            .project(exprs)?
            .build()?;
            inputs.push(scan);
        }
        let plan = self.node.with_new_exprs(self.node.expressions(), inputs)?;
        let state = self.state.clone();
        let schema = self.schema.clone();
        crate::stream::block_on(async move {
            // The node was optimized with the whole query; only physical planning is left.
            let physical = DefaultPhysicalPlanner::default()
                .create_physical_plan(&plan, &state)
                .await?;
            let batches = collect(physical, state.task_ctx()).await?;
            batches
                .into_iter()
                .map(|b| {
                    crate::stream::batch_of(schema.clone(), b.columns().to_vec(), b.num_rows())
                })
                .collect()
        })
    }

    fn fire(&mut self, span: Span, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if self.lateness == 0 {
            if let Some(buffered) = self.buffers.remove(&span) {
                let rows = self.loaded(&buffered)?;
                self.remove(&buffered)?;
                let batches = self.run(rows)?;
                out.extend(
                    batches
                        .into_iter()
                        .filter(|b| b.num_rows() > 0)
                        .map(ChangeBatch::new),
                );
            }
            return Ok(());
        }
        // Kept for corrections: the rows, and what the window emitted.
        let Some(buffered) = self.buffers.get(&span) else {
            return Ok(());
        };
        let rows = self.loaded(buffered)?;
        let new: Vec<RecordBatch> = self
            .run(rows)?
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .collect();
        match self.emitted.insert(span, KeptRows::Memory(new.clone())) {
            Some(old) => {
                let old = old.take(self.spill.as_mut(), &self.schema)?;
                out.extend(
                    old.into_iter()
                        .map(|b| ChangeBatch::with_op(b, Op::UpdateBefore)),
                );
                out.extend(
                    new.into_iter()
                        .map(|b| ChangeBatch::with_op(b, Op::UpdateAfter)),
                );
            }
            None => out.extend(new.into_iter().map(ChangeBatch::new)),
        }
        self.emitted_changed.insert(span);
        Ok(())
    }

    /// Drops the windows whose lateness the watermark passed: their rows (fired windows
    /// without a lateness went when they fired) and what they emitted.
    fn drop_passed(&mut self, watermark: Millis) -> Result<()> {
        let lateness = self.lateness;
        let passed = |s: &Span| fired(s.1 + lateness, watermark);
        let gone: Vec<Span> = self.buffers.keys().filter(|s| passed(s)).copied().collect();
        for span in gone {
            let buffered = self.buffers.remove(&span).expect("listed");
            self.remove(&buffered)?;
        }
        let expired: Vec<Span> = self.emitted.keys().filter(|s| passed(s)).copied().collect();
        for span in expired {
            let rows = self.emitted.remove(&span).expect("listed");
            rows.forget(self.spill.as_mut())?;
        }
        // Without checkpoints no snapshot empties it.
        self.emitted_changed.retain(|s| !passed(s));
        Ok(())
    }

    /// The buffered rows and emitted windows, whole or as what changed since the
    /// previous snapshot: the batches buffered since, and the emitted rows of windows
    /// fired or corrected since (numbered with this snapshot). Windows gone since are
    /// not named: a restore drops them again by its watermark ([`Operator::restored`]).
    fn snapshot_of(&mut self, whole: bool) -> Result<Vec<RecordBatch>> {
        self.snapshots += 1;
        let mut out = vec![snapshot::progress(self.watermark, self.late)?];
        let buffers = &self.buffers;
        self.snapshotted
            .retain(|span, _| buffers.contains_key(span));
        for (span, inputs) in &self.buffers {
            let taken = self
                .snapshotted
                .entry(*span)
                .or_insert_with(|| vec![0; inputs.len()]);
            for (input, changes) in inputs.iter().enumerate() {
                let from = if whole { 0 } else { taken[input] };
                for change in &changes[from..] {
                    // Those on disk are read off the task (`spilled_snapshot`).
                    match change {
                        Buffered::Memory(change) => out.push(rows_batch(*span, input, change)?),
                        Buffered::Disk(stored) if !whole => {
                            self.unsnapshotted_on_disk.push(*stored)
                        }
                        Buffered::Disk(_) => {}
                    }
                }
                taken[input] = changes.len();
            }
        }
        // Fired windows kept for late corrections: what they emitted is retracted then.
        let changed = std::mem::take(&mut self.emitted_changed);
        for (span, kept) in &self.emitted {
            if !whole && !changed.contains(span) {
                continue;
            }
            // Rows on disk are unchanged since they went (a correction brings them back);
            // a whole snapshot reads them off the task.
            let Some(batches) = kept.in_memory() else {
                continue;
            };
            let (emitted, fired, head) = if whole {
                ("emitted", "fired", vec![span.0, span.1])
            } else {
                (
                    EMITTED_CHANGED,
                    FIRED_CHANGED,
                    vec![span.0, span.1, self.snapshots],
                )
            };
            let rows: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
            for b in &rows {
                out.push(snapshot::batch(emitted, &head, b.columns().to_vec())?);
            }
            if rows.is_empty() {
                out.push(snapshot::batch(fired, &head, vec![])?);
            }
        }
        Ok(out)
    }

    fn add_rows(&mut self, input: usize, batch: ChangeBatch) -> Result<()> {
        let Some(windows) = &self.windows else {
            self.buffer(EVERYTHING, input, batch);
            return Ok(());
        };
        let (start, end) = windows[input];
        let starts = to_millis(batch.rows.column(start))?;
        let ends = to_millis(batch.rows.column(end))?;
        let mut by_window: BTreeMap<Span, Vec<u32>> = BTreeMap::new();
        let (mut late, mut late_watermarks) = (Vec::new(), Vec::new());
        for i in 0..batch.num_rows() {
            let span = (starts.value(i), ends.value(i));
            let watermark = batch.watermark_of(i, self.watermark);
            if fired(span.1 + self.lateness, watermark) {
                self.late += 1;
                late.push(i as u32);
                late_watermarks.push(watermark);
                continue;
            }
            if self.emitted.contains_key(&span) {
                self.dirty.insert(span);
            }
            by_window.entry(span).or_default().push(i as u32);
        }
        if let Some(sink) = &mut self.late_rows {
            sink.record("WindowOperator", &batch.rows, late, late_watermarks)?;
        }
        for (span, rows) in by_window {
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                batch.take(&UInt32Array::from(rows))?
            };
            self.buffer(span, input, part);
        }
        Ok(())
    }
}

/// The `rows` state batch of `change`, buffered for input `input` of window `span`.
fn rows_batch(span: Span, input: usize, change: &ChangeBatch) -> Result<RecordBatch> {
    let mut columns = change.rows.columns().to_vec();
    if let Some(ops) = &change.ops {
        columns.push(Arc::new(ops.clone()));
    }
    let head = [span.0, span.1, input as i64, change.ops.is_some() as i64];
    snapshot::batch("rows", &head, columns)
}

impl Operator for Fragment {
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        self.add_rows(input, batch)?;
        // Late rows within the allowed lateness correct their windows at once.
        for span in std::mem::take(&mut self.dirty) {
            self.fire(span, out)?;
        }
        self.move_out_early()
    }

    fn on_watermark(&mut self, watermark: Millis, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.watermark = watermark;
        if self.windows.is_none() {
            return Ok(());
        }
        let due: Vec<Span> = self
            .buffers
            .keys()
            .filter(|s| fired(s.1, watermark) && !self.emitted.contains_key(s))
            .copied()
            .collect();
        for span in due {
            self.fire(span, out)?;
        }
        self.drop_passed(watermark)
    }

    fn on_end(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if self.windows.is_none() {
            let n = self.inputs.len();
            self.buffers
                .entry(EVERYTHING)
                .or_insert_with(|| vec![Vec::new(); n]);
        }
        let all: Vec<Span> = self
            .buffers
            .keys()
            .filter(|s| !self.emitted.contains_key(s))
            .copied()
            .collect();
        for span in all {
            self.fire(span, out)?;
        }
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.held_in_memory() + self.spill.as_ref().map_or(0, |s| s.files.bytes())
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

    /// Fragments are keyed by window: every state batch names its window in its header.
    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let Some(windows) = &self.windows else {
            return Ok(None);
        };
        let input = if snapshot::kind(batch)? == "rows" {
            snapshot::parts(batch, 3)?.1[2] as usize
        } else {
            0
        };
        let (start, end) = windows[input];
        let fields = self.inputs[input].fields();
        let as_column = |at: usize, column: usize| -> Result<ArrayRef> {
            let millis = cast(
                batch.column(at),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )?;
            let ty = match fields[column].data_type() {
                DataType::Timestamp(unit, tz) => {
                    let tagged = cast(
                        &millis,
                        &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
                    )?;
                    return Ok(cast(&tagged, &DataType::Timestamp(*unit, tz.clone()))?);
                }
                other => other.clone(),
            };
            Ok(cast(batch.column(at), &ty)?)
        };
        Ok(Some(vec![as_column(0, start)?, as_column(1, end)?]))
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        for batch in state {
            let (kind, _, _) = snapshot::parts(&batch, 0)?;
            match kind.as_str() {
                "progress" => {
                    let (_, head, _) = snapshot::parts(&batch, 2)?;
                    (self.watermark, self.late) = snapshot::read_progress(&head);
                    continue;
                }
                "emitted" | "fired" | EMITTED_CHANGED | FIRED_CHANGED => {
                    let changed = kind == EMITTED_CHANGED || kind == FIRED_CHANGED;
                    let (_, head, columns) = snapshot::parts(&batch, 2 + changed as usize)?;
                    let window = (head[0], head[1]);
                    // A later snapshot's rows of a window replace the earlier ones'.
                    if changed && self.restored_from.get(&window) != Some(&head[2]) {
                        self.restored_from.insert(window, head[2]);
                        self.emitted.remove(&window);
                    }
                    let emitted = self
                        .emitted
                        .entry(window)
                        .or_insert_with(|| KeptRows::Memory(vec![]));
                    let KeptRows::Memory(emitted) = emitted else {
                        unreachable!("restored rows stay in memory until the restore ends");
                    };
                    if kind == "emitted" || kind == EMITTED_CHANGED {
                        emitted.push(crate::stream::batch_of(
                            self.schema.clone(),
                            columns,
                            batch.num_rows(),
                        )?);
                    }
                    continue;
                }
                _ => {}
            }
            let (span, input, rows) = self.decode_rows(&batch)?;
            self.buffer(span, input, rows);
        }
        Ok(())
    }

    /// The windows of a whole snapshot and the changes after it that the restored
    /// watermark had fired or dropped go, as they went then.
    fn restored(&mut self) -> Result<()> {
        self.restored_from.clear();
        if self.windows.is_some() {
            self.drop_passed(self.watermark)?;
        }
        // Everything restored is in the checkpoint already: what is beyond the budget
        // may go to disk at once.
        if self.spill.is_some() {
            for (span, inputs) in &self.buffers {
                self.snapshotted
                    .insert(*span, inputs.iter().map(Vec::len).collect());
            }
            self.move_out(false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::functions_aggregate::expr_fn::sum;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::stream::operator::testing::{restores_from_incremental_snapshots, Step};
    use crate::stream::ops::window_agg::tests::{input_schema, rows};

    /// SUM(v) per window and k, run by DataFusion when a window closes.
    fn fragment(lateness: Millis) -> Fragment {
        let node = datafusion::logical_expr::table_scan(Some("t"), &input_schema(), None)
            .unwrap()
            .aggregate(
                vec![col("window_start"), col("window_end"), col("k")],
                vec![sum(col("v"))],
            )
            .unwrap()
            .build()
            .unwrap();
        let schema = Arc::new(node.schema().as_arrow().clone());
        let mut f = Fragment::new(
            SessionContext::new().state(),
            node,
            Some(vec![(2, 3)]),
            schema,
        );
        f.lateness = lateness;
        f
    }

    /// Windows filling in several steps, firing, and rows late for a fired window
    /// (within a lateness, or dropped): window [0, 10) fires at watermark 12, and late
    /// rows correct it in the next two steps (with a lateness of 50).
    fn steps() -> Vec<Step> {
        vec![
            (rows(&[(1, 1, 5), (2, 2, 6), (1, 4, 18)]), 4),
            (rows(&[(1, 8, 2), (3, 1, 25)]), 12),
            (rows(&[(2, 3, 7), (3, 5, 28)]), 29),
            (rows(&[(1, 2, 21), (2, 7, 44), (1, 5, 3)]), 45),
            (rows(&[(3, 6, 41), (4, 1, 60)]), 58),
            (rows(&[(4, 2, 65), (2, 1, 49)]), 200),
        ]
    }

    /// Under the sled backend with a budget of 0, every snapshot moves the buffered rows
    /// out: windows read them back when they fire (and when late rows correct them),
    /// whole snapshots read them off the task, and what is dropped leaves the disk.
    /// Output and restores are those of the fragment in memory.
    #[test]
    fn buffered_rows_on_disk_give_the_same_windows_and_restores() {
        use crate::stream::operator::testing::{backend_without_memory, run_step, snapshot_of};
        let (_dir, backend) = backend_without_memory();
        // With `early`, rows go to disk after every batch too, before snapshots.
        for (lateness, early) in [(0, false), (50, false), (0, true), (50, true)] {
            let fresh = || {
                let mut f = fragment(lateness).with_backend(Some(&backend)).unwrap();
                if early {
                    f.early = Some(EarlyEmitMark::with_slack(0, 0));
                }
                f
            };
            let mut memory = fragment(lateness);
            let mut disk = fresh();
            let (mut went, mut went_early) = (0, false);
            for (i, step) in steps().iter().enumerate() {
                assert_eq!(
                    run_step(&mut disk, step),
                    run_step(&mut memory, step),
                    "step {i}"
                );
                went_early |= disk.buffers.iter().any(|(span, inputs)| {
                    let taken = disk.snapshotted.get(span).cloned().unwrap_or_default();
                    inputs.iter().enumerate().any(|(input, changes)| {
                        let from = taken.get(input).copied().unwrap_or(0);
                        changes[from..]
                            .iter()
                            .any(|b| matches!(b, Buffered::Disk(_)))
                    })
                });
                let lines = |b: &[RecordBatch]| {
                    let mut l: Vec<String> = b.iter().map(|b| format!("{b:?}")).collect();
                    l.sort();
                    l
                };
                let (of_disk, of_memory) = (
                    snapshot_of(&mut disk, i == 0),
                    snapshot_of(&mut memory, i == 0),
                );
                if i == 0 {
                    assert_eq!(lines(&of_disk), lines(&of_memory));
                }
                let on_disk = disk.spill.as_ref().expect("backend").files.bytes();
                if i == 3 {
                    // A whole snapshot reads what is on disk.
                    assert!(on_disk > 0);
                    let (of_disk, of_memory) =
                        (snapshot_of(&mut disk, true), snapshot_of(&mut memory, true));
                    assert_eq!(lines(&of_disk), lines(&of_memory));
                }
                went += (on_disk > 0) as usize;
                assert_eq!(disk.buffered_in_memory(), 0, "step {i}: all moved out");
                // So are fired windows' rows: late rows correct them from disk (window
                // [0, 10) in step 2, after it fired in step 1).
                assert!(
                    disk.emitted
                        .values()
                        .all(|e| matches!(e, KeptRows::Disk(_))),
                    "step {i}"
                );
            }
            assert!(went >= 3, "rows went to disk after {went} steps");
            assert_eq!(went_early, early, "rows went to disk before a snapshot");
            assert_eq!(disk.spill.as_ref().unwrap().files.bytes(), 0, "all dropped");
            restores_from_incremental_snapshots(fresh, &steps(), lateness > 0, |f| {
                (f.buffers.len(), f.emitted.len())
            });
        }
    }

    #[test]
    fn incremental_snapshots_restore_what_a_whole_one_would() {
        for lateness in [0, 50] {
            restores_from_incremental_snapshots(
                || fragment(lateness),
                &steps(),
                lateness > 0,
                |f| (f.buffers.len(), f.emitted.len()),
            );
        }
    }
}
