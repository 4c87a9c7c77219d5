//! Window table functions as an operator: appends window_start, window_end and
//! window_time to each row. For a window aggregate directly above it, rows get their
//! *slice* bounds instead (one row each, whatever the window overlap), and the aggregate
//! combines slices into windows.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, UInt32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Result;

use crate::stream::message::ChangeBatch;
use crate::stream::operator::Operator;
use crate::stream::source::to_millis;
use crate::stream::window::Slicing;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assign {
    /// One output row per window a row belongs to.
    Windows,
    /// One output row per input row, carrying its slice.
    Slices,
}

pub struct WindowAssign {
    pub slicing: Slicing,
    pub time_column: usize,
    pub assign: Assign,
    /// The input's columns plus window_start, window_end, window_time.
    pub schema: SchemaRef,
}

/// A millisecond array as the type of `schema`'s column `i`.
pub fn millis_column(values: Vec<i64>, schema: &SchemaRef, i: usize) -> Result<ArrayRef> {
    let array: ArrayRef = Arc::new(Int64Array::from(values));
    let ty = schema.field(i).data_type();
    let as_ms = cast(
        &array,
        &datafusion::arrow::datatypes::DataType::Timestamp(
            datafusion::arrow::datatypes::TimeUnit::Millisecond,
            None,
        ),
    )?;
    Ok(cast(&as_ms, ty)?)
}

impl Operator for WindowAssign {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let times = to_millis(batch.rows.column(self.time_column))?;
        let mut take = Vec::with_capacity(batch.num_rows());
        let (mut starts, mut ends, mut row_times) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..times.len() {
            if times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            match self.assign {
                Assign::Slices => {
                    let (s, e) = self.slicing.slice_of(t);
                    take.push(i as u32);
                    starts.push(s);
                    ends.push(e);
                    row_times.push(t);
                }
                Assign::Windows => {
                    for (s, e) in self.slicing.windows_of_time(t) {
                        take.push(i as u32);
                        starts.push(s);
                        ends.push(e);
                        row_times.push(e - 1);
                    }
                }
            }
        }
        let identity = take.len() == batch.num_rows()
            && take.iter().enumerate().all(|(i, t)| *t as usize == i);
        let base = if identity {
            batch
        } else {
            batch.take(&UInt32Array::from(take))?
        };
        let n = self.schema.fields().len();
        let mut columns = base.rows.columns().to_vec();
        columns.push(millis_column(starts, &self.schema, n - 3)?);
        columns.push(millis_column(ends, &self.schema, n - 2)?);
        columns.push(millis_column(row_times, &self.schema, n - 1)?);
        out.push(ChangeBatch {
            rows: RecordBatch::try_new(self.schema.clone(), columns)?,
            watermarks: base.watermarks,
            ops: base.ops,
        });
        Ok(())
    }
}
