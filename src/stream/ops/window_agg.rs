//! Window aggregation over TUMBLE, HOP and CUMULATE windows (by slices) and over windows
//! given by upstream window_start/window_end columns. Emits one insert-only row per window
//! and key when the watermark reaches window_end - 1.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

use super::grouped::{AggregateCalls, Grouped, Partial};
use super::window_assign::millis_column;
use crate::stream::message::{ChangeBatch, Millis, NO_WATERMARK};
use crate::stream::operator::Operator;
use crate::stream::source::to_millis;
use crate::stream::window::{fired, Slicing, Span};

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
    partials: Vec<Partial>,
}

impl Slice {
    fn size(&self) -> usize {
        self.live.as_ref().map(|g| g.size()).unwrap_or(0)
            + self.partials.iter().map(|p| p.size()).sum::<usize>()
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
        let slices = self.slicing.slices_of_window(window);
        // A slice no later window needs is consumed in place.
        let mut state: Option<Grouped> = None;
        for slice in slices {
            let last = self.slicing.last_end(slice) == window.1;
            let Some(entry) = self.slices.get_mut(&slice) else {
                continue;
            };
            if last && state.is_none() && entry.partials.is_empty() {
                if let Some(live) = self.slices.remove(&slice).and_then(|s| s.live) {
                    state = Some(live);
                }
                continue;
            }
            if let Some(mut live) = entry.live.take() {
                if !live.is_empty() {
                    entry.partials.push(live.freeze()?);
                }
            }
            let target = match &mut state {
                Some(s) => s,
                None => state.insert(self.calls.new_state()?),
            };
            for partial in &entry.partials {
                target.merge(partial)?;
            }
        }
        let Some(mut state) = state else {
            return Ok(());
        };
        let (keys, values) = state.evaluate()?;
        let rows = keys
            .first()
            .map(|k| k.len())
            .or(values.first().map(|v| v.len()))
            .unwrap_or(0);
        if rows == 0 {
            return Ok(());
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
        out.push(ChangeBatch::new(RecordBatch::try_new(
            self.schema.clone(),
            columns,
        )?));
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
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let starts = to_millis(batch.rows.column(self.start_column))?;
        let ends = to_millis(batch.rows.column(self.end_column))?;
        // Rows of a batch fall into a few slices, usually one, and come in runs: a short
        // list searched from the last slice used beats hashing every row.
        let mut by_slice: Vec<(Span, Vec<u32>)> = Vec::new();
        let mut last = 0;
        let mut kept = 0usize;
        for i in 0..batch.num_rows() {
            let slice = (starts.value(i), ends.value(i));
            let last_end = self.slicing.last_end(slice);
            if fired(last_end, batch.watermark_of(i, self.watermark)) {
                self.late += 1;
                continue;
            }
            kept += 1;
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
        let slicing = &self.slicing;
        self.slices
            .retain(|slice, _| !fired(slicing.last_end(*slice), watermark));
        self.watermark = watermark;
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.slices.values().map(Slice::size).sum()
    }

    fn late_rows_dropped(&self) -> u64 {
        self.late
    }
}
