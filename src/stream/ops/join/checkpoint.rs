//! The join's checkpoints: a `progress` batch (the watermark), and per input batches of
//! its entries (the row's columns, then count, matches, touched, time, and the serial's
//! origin and counter). A whole snapshot holds every entry; an incremental one the
//! serials removed since the previous snapshot (a `-removed` batch per input) and the
//! entries added or changed since. Restoring replaces entries by serial, so the layers
//! of a chain apply in order.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

use super::side::{self, EntryId};
use super::spill::{read_frozen, FrozenSide};
use super::{Encoded, StreamJoin};
use crate::stream::operator::StateReader;
use crate::stream::snapshot;

const SIDE_KINDS: [&str; 2] = ["join-left", "join-right"];
const REMOVED_KINDS: [&str; 2] = ["join-left-removed", "join-right-removed"];
/// Columns after a row's own: count, matches, touched, time, origin, counter.
const FIGURES: usize = 6;
/// Entries per batch of a snapshot.
const SNAPSHOT_ROWS: usize = 1 << 16;
/// Consecutive rows of one chunk from which a snapshot shares the chunk's buffers rather
/// than copying the rows among others.
const SHARED_RUN_ROWS: usize = 1024;

/// A batch of input `s`'s entries: their rows' `columns`, then each entry's figures
/// (count, matches, touched, time, and the serial's origin and counter).
pub(super) fn side_state(
    s: usize,
    mut columns: Vec<ArrayRef>,
    figures: impl Iterator<Item = [i64; FIGURES]>,
) -> Result<RecordBatch> {
    let rows = figures.size_hint().0;
    let mut values: [Vec<i64>; FIGURES] = std::array::from_fn(|_| Vec::with_capacity(rows));
    for entry in figures {
        for (column, value) in values.iter_mut().zip(entry) {
            column.push(value);
        }
    }
    columns.extend(
        values
            .into_iter()
            .map(|v| Arc::new(Int64Array::from(v)) as ArrayRef),
    );
    snapshot::batch(SIDE_KINDS[s], &[], columns)
}

fn int64(columns: &[ArrayRef], i: usize) -> Result<&Int64Array> {
    snapshot::column(columns, i)
}

impl StreamJoin {
    /// Every entry of both inputs; what changed is now recorded.
    pub(super) fn whole_snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        let mut batches = vec![snapshot::progress(self.watermark, 0)?];
        for s in 0..2 {
            let ids = self.sides[s].live_ids();
            batches.extend(self.side_batches(s, &ids)?);
            self.sides[s].forget_changes();
        }
        Ok(batches)
    }

    /// The entries removed, added or changed since the previous snapshot.
    pub(super) fn changed_snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        let mut batches = vec![snapshot::progress(self.watermark, 0)?];
        for (s, kind) in REMOVED_KINDS.iter().enumerate() {
            let (ids, removed) = self.sides[s].take_changes();
            let column = |f: fn(&side::Serial) -> u64| -> ArrayRef {
                Arc::new(Int64Array::from_iter_values(
                    removed.iter().map(|r| f(r) as i64),
                ))
            };
            batches.push(snapshot::batch(
                kind,
                &[],
                vec![column(|r| r.0), column(|r| r.1)],
            )?);
            batches.extend(self.side_batches(s, &ids)?);
        }
        Ok(batches)
    }

    /// The entries on disk as they are now: all of them (`whole`), or those changed since
    /// the previous snapshot; taken right after [`Self::whole_snapshot`] or
    /// [`Self::changed_snapshot`].
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let sides: Vec<FrozenSide> = (0..2)
            .map(|s| self.freeze_spilled(s, whole))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        if sides.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(move |out| {
            sides.iter().try_for_each(|side| read_frozen(side, out))
        })))
    }

    /// Entries `ids` of input `s`, rows and figures, in their order, [`SNAPSHOT_ROWS`] a
    /// batch at most: a checkpoint stores big state a batch at a time, and a batch of
    /// every changed row was one more copy of them all. A run of at least
    /// [`SHARED_RUN_ROWS`] consecutive rows of one chunk is a batch of its own that
    /// shares the chunk's buffers: the rows an insert-only side took since the previous
    /// snapshot were copied by the task at each barrier (Nexmark q20: 1.4 GB in one
    /// snapshot, 1 to 5 s without processing).
    fn side_batches(&self, s: usize, ids: &[EntryId]) -> Result<Vec<RecordBatch>> {
        if ids.is_empty() {
            return Ok(vec![self.side_batch(s, ids, false)?]);
        }
        // Pieces of `ids` in order: (start, end, shared run).
        let mut pieces = Vec::new();
        let (mut copied, mut at) = (0, 0);
        while at < ids.len() {
            let run = self.sides[s].run_len(&ids[at..]);
            if run >= SHARED_RUN_ROWS {
                pieces.push((copied, at, false));
                pieces.push((at, at + run, true));
                copied = at + run;
            }
            at += run;
        }
        pieces.push((copied, ids.len(), false));
        let mut batches = Vec::new();
        for (start, end, shared) in pieces {
            let step = if shared { end - start } else { SNAPSHOT_ROWS };
            for piece in ids[start..end].chunks(step) {
                batches.push(self.side_batch(s, piece, shared)?);
            }
        }
        Ok(batches)
    }

    /// Entries `ids` of input `s`: their rows copied, or shared when `run` (consecutive
    /// rows of one chunk).
    fn side_batch(&self, s: usize, ids: &[EntryId], run: bool) -> Result<RecordBatch> {
        let side = &self.sides[s];
        let rows = match run {
            true => side.run_rows(ids),
            false => side.gather(ids)?,
        };
        let figures = ids.iter().map(|&id| {
            let (e, serial) = (side.entry(id), side.serial(id));
            [
                e.count as i64,
                e.matches,
                e.touched,
                e.time,
                serial.0 as i64,
                serial.1 as i64,
            ]
        });
        side_state(s, rows.columns().to_vec(), figures)
    }

    /// The join key of each entry of a state batch; removed serials go to every subtask
    /// (a serial names one entry wherever it is).
    pub(super) fn state_row_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let kind = snapshot::kind(batch)?;
        let Some(s) = SIDE_KINDS.iter().position(|k| *k == kind) else {
            return Ok(None);
        };
        let width = self.spec.inputs[s].fields().len();
        let rows = crate::stream::batch_of(
            self.spec.inputs[s].clone(),
            batch.columns()[..width].to_vec(),
            batch.num_rows(),
        )?;
        self.key_columns(s, &rows).map(Some)
    }

    /// Puts back whole and incremental snapshots, in order; adds to the entries there
    /// are, so a rescaled subtask takes several old subtasks' entries.
    pub(super) fn restore_layers(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        for batch in state {
            let (kind, _, columns) = snapshot::parts(&batch, 0)?;
            if kind == "progress" {
                let (_, head, _) = snapshot::parts(&batch, 2)?;
                self.watermark = snapshot::read_progress(&head).0;
            } else if let Some(s) = REMOVED_KINDS.iter().position(|k| *k == kind) {
                let (origins, counters) = (int64(&columns, 0)?, int64(&columns, 1)?);
                let serials: Vec<side::Serial> = (0..batch.num_rows())
                    .map(|i| (origins.value(i) as u64, counters.value(i) as u64))
                    .collect();
                if self.spill.is_some() {
                    self.unstage_removed(s, &serials)?;
                }
                for serial in serials {
                    self.sides[s].remove_serial(serial);
                }
            } else if let Some(s) = SIDE_KINDS.iter().position(|k| *k == kind) {
                self.restore_side(s, &batch)?;
            } else {
                return Err(DataFusionError::Internal(format!(
                    "a join cannot restore {kind} state"
                )));
            }
        }
        Ok(())
    }

    /// After the last [`Self::restore_layers`]: staged entries become runs on disk, and
    /// whatever is in memory beyond the budget goes there too.
    pub(super) fn finish_restore(&mut self) -> Result<()> {
        self.runs_of_restored()?;
        for side in &mut self.sides {
            side.restored();
        }
        self.shed(0)?;
        self.shed(1)
    }

    fn restore_side(&mut self, s: usize, batch: &RecordBatch) -> Result<()> {
        let width = self.spec.inputs[s].fields().len();
        let columns = batch.columns();
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let figure = |k: usize| int64(columns, width + k);
        let (count, matches, touched, time) = (figure(0)?, figure(1)?, figure(2)?, figure(3)?);
        // Snapshots from before serials: the entries get new ones of this run.
        let serials = if columns.len() >= width + FIGURES {
            Some((figure(4)?, figure(5)?))
        } else {
            None
        };
        if let (Some(serials), true) = (serials, self.spill.is_some()) {
            return self.stage_restored(s, batch, serials, [count, matches, touched, time]);
        }
        let rows =
            crate::stream::batch_of(self.spec.inputs[s].clone(), columns[..width].to_vec(), n)?;
        let keys = Encoded::new(&self.keys, &self.key_columns(s, &rows)?)?;
        let full = Encoded::new(&self.rows[s], rows.columns())?;
        let chunk = self.sides[s].push_chunk(rows);
        for i in 0..n {
            let side = &mut self.sides[s];
            let serial = serials.map(|(o, c)| (o.value(i) as u64, c.value(i) as u64));
            if let Some(serial) = serial {
                // A later layer's entry replaces the earlier one.
                side.remove_serial(serial);
            }
            let id = side.insert(
                keys.get(i),
                full.get(i),
                (chunk, i as u32),
                matches.value(i),
                (touched.value(i), time.value(i)),
            );
            side.entry_mut(id).count = count.value(i) as u32;
            if let Some(serial) = serial {
                side.adopt_serial(id, serial);
            }
            if let Some(iv) = &self.spec.interval {
                side.deadlines
                    .entry(iv.deadline(s, time.value(i)))
                    .or_default()
                    .push(id);
            }
        }
        self.sides[s].settle()
    }
}
