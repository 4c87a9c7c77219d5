//! Applying a changelog to a table's rows: inserts add a row, retractions remove an equal
//! one. Views and query results whose rows change are kept this way.

use std::collections::HashMap;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::OwnedRow;
use datafusion::common::Result;

use super::message::ChangeBatch;

/// `current` with `changes` applied. Without retractions the changes' rows are appended
/// as they are; otherwise the rows are rebuilt as one batch, in first-seen order.
pub fn apply(
    schema: &SchemaRef,
    mut current: Vec<RecordBatch>,
    changes: Vec<ChangeBatch>,
) -> Result<Vec<RecordBatch>> {
    // Inserts and updates-after with nothing retracted only add rows.
    if !changes.iter().any(ChangeBatch::retracts_any) {
        current.extend(
            changes
                .into_iter()
                .map(|c| c.rows)
                .filter(|b| b.num_rows() > 0),
        );
        return Ok(current);
    }
    let converter = super::row_converter(schema.fields())?;
    let mut counts: HashMap<OwnedRow, i64> = HashMap::new();
    let mut order: Vec<OwnedRow> = Vec::new();
    let mut add = |row: OwnedRow, delta: i64| {
        let count = counts.entry(row.clone()).or_insert_with(|| {
            order.push(row);
            0
        });
        *count += delta;
    };
    for batch in &current {
        let rows = converter.convert_columns(batch.columns())?;
        for row in rows.iter() {
            add(row.owned(), 1);
        }
    }
    for change in &changes {
        let rows = converter.convert_columns(change.rows.columns())?;
        for (i, row) in rows.iter().enumerate() {
            add(row.owned(), if change.retracts(i) { -1 } else { 1 });
        }
    }
    let mut kept = converter.empty_rows(order.len(), 0);
    for row in &order {
        for _ in 0..counts[row].max(0) {
            kept.push(row.row());
        }
    }
    let columns = converter.convert_rows(kept.iter())?;
    let n = kept.num_rows();
    if n == 0 {
        return Ok(vec![]);
    }
    Ok(vec![super::batch_of(schema.clone(), columns, n)?])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::stream::message::Op;

    fn batch(schema: &SchemaRef, k: &[&str], v: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(k.to_vec())),
                Arc::new(Int64Array::from(v.to_vec())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn retractions_remove_one_equal_row_each() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let current = vec![batch(&schema, &["a", "b", "a"], &[1, 2, 1])];
        let changes = vec![
            ChangeBatch::with_op(batch(&schema, &["a"], &[1]), Op::UpdateBefore),
            ChangeBatch::with_op(batch(&schema, &["a"], &[5]), Op::UpdateAfter),
        ];
        let out = apply(&schema, current, changes).unwrap();
        assert_eq!(out[0], batch(&schema, &["a", "b", "a"], &[1, 2, 5]));
    }

    #[test]
    fn changes_that_retract_nothing_are_appended_as_they_are() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let current = vec![batch(&schema, &["a"], &[1])];
        let added = batch(&schema, &["a", "b"], &[1, 2]);
        let mut changes = ChangeBatch::with_op(added.clone(), Op::Insert);
        changes.ops = Some(vec![Op::Insert as i8, Op::UpdateAfter as i8].into());
        let out = apply(&schema, current.clone(), vec![changes]).unwrap();
        assert_eq!(out, vec![current[0].clone(), added]);
    }
}
