//! Operator state as Arrow batches, for checkpoints: each batch says what it holds in its
//! schema metadata, so restoring needs nothing but the batches and the operator's plan.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BinaryBuilder, Int64Array};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result};

const KIND: &str = "weir.state";

/// Byte strings (keys, encoded rows) as one column, its buffers sized at once: a big
/// snapshot's column grown by doubling is copied again and again into fresh pages.
pub fn binary<'a>(rows: impl IntoIterator<Item = &'a [u8], IntoIter: Clone>) -> ArrayRef {
    let rows = rows.into_iter();
    let (count, bytes) = rows.clone().fold((0, 0), |(n, b), r| (n + 1, b + r.len()));
    let mut column = BinaryBuilder::with_capacity(count, bytes);
    for row in rows {
        column.append_value(row);
    }
    Arc::new(column.finish())
}

/// A batch of `kind` whose leading columns are the integers `head` (repeated on every row)
/// followed by `columns`.
pub fn batch(kind: &str, head: &[i64], columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    let rows = columns.first().map(|c| c.len()).unwrap_or(1);
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (i, v) in head.iter().enumerate() {
        fields.push(Field::new(
            format!("h{i}"),
            datafusion::arrow::datatypes::DataType::Int64,
            false,
        ));
        arrays.push(Arc::new(Int64Array::from(vec![*v; rows])));
    }
    for (i, c) in columns.into_iter().enumerate() {
        fields.push(Field::new(format!("c{i}"), c.data_type().clone(), true));
        arrays.push(c);
    }
    let schema =
        Schema::new(fields).with_metadata(HashMap::from([(KIND.to_string(), kind.to_string())]));
    super::batch_of(Arc::new(schema), arrays, rows)
}

/// What `batch` holds, its `heads` leading integers, and the rest of its columns.
pub fn parts(batch: &RecordBatch, heads: usize) -> Result<(String, Vec<i64>, Vec<ArrayRef>)> {
    let kind = batch
        .schema()
        .metadata()
        .get(KIND)
        .cloned()
        .ok_or_else(|| DataFusionError::Internal("a state batch without its kind".into()))?;
    let mut head = Vec::with_capacity(heads);
    for i in 0..heads {
        let column = batch
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| DataFusionError::Internal("a state batch without its header".into()))?;
        head.push(if column.is_empty() {
            0
        } else {
            column.value(0)
        });
    }
    Ok((kind, head, batch.columns()[heads..].to_vec()))
}

/// How many leading integers `batch` has (the columns [`batch`] names `h0`, `h1`...).
pub fn heads(batch: &RecordBatch) -> usize {
    batch
        .schema()
        .fields()
        .iter()
        .take_while(|f| f.name().starts_with('h'))
        .count()
}

/// What `batch` holds.
pub fn kind(batch: &RecordBatch) -> Result<String> {
    parts(batch, 0).map(|(kind, ..)| kind)
}

/// A state column as the array type it was written as.
pub fn downcast<T: 'static>(column: &ArrayRef) -> Result<&T> {
    column
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| DataFusionError::Internal("a state column of another type".into()))
}

/// Column `i` of a state batch's columns, as the array type it was written as.
pub fn column<T: 'static>(columns: &[ArrayRef], i: usize) -> Result<&T> {
    downcast(
        columns
            .get(i)
            .ok_or_else(|| DataFusionError::Internal("a state batch lacks a column".into()))?,
    )
}

/// An operator's watermark and late-row count.
pub fn progress(watermark: i64, late: u64) -> Result<RecordBatch> {
    batch("progress", &[watermark, late as i64], vec![])
}

/// The watermark and late-row count of a `progress` batch's header.
pub fn read_progress(head: &[i64]) -> (i64, u64) {
    (head[0], head[1] as u64)
}
