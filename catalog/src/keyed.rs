//! The current rows of a table with a primary key, by key: what its log adds up to.
//!
//! A keyed table's log is a changelog (+I, -U, +U, -D). Writes are normalised against
//! the current rows before they are appended — an insert of a key that exists replaces
//! its row, a retraction takes away the row the key has now — so the log always reads as
//! a consistent changelog, and followers can replay it without knowing the key.

use std::collections::BTreeMap;

use arrow::array::{ArrayRef, Int8Array};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use arrow::row::{OwnedRow, RowConverter, SortField};

use crate::table_def::TableDef;
use crate::table_log::{op, Changes, Offset};

/// Rows per batch [`KeyedRows::current`] returns.
const CHUNK: usize = 8192;

/// Key -> current row of one keyed table, as of log offset `next`.
#[derive(Debug)]
pub struct KeyedRows {
    schema: SchemaRef,
    key_columns: Vec<usize>,
    keys: RowConverter,
    rows: RowConverter,
    current: BTreeMap<OwnedRow, OwnedRow>,
    /// The log entries before this offset are applied.
    pub(crate) next: Offset,
}

impl KeyedRows {
    /// An empty index for `def`, whose primary key must name stored columns.
    pub fn new(def: &TableDef) -> Result<Self, ArrowError> {
        let schema = def.physical_schema();
        let key_columns = def
            .primary_key
            .iter()
            .map(|k| schema.index_of(k))
            .collect::<Result<Vec<_>, _>>()?;
        let sort_field = |i: usize| SortField::new(schema.field(i).data_type().clone());
        Ok(Self {
            keys: RowConverter::new(key_columns.iter().map(|&i| sort_field(i)).collect())?,
            rows: RowConverter::new((0..schema.fields().len()).map(sort_field).collect())?,
            key_columns,
            schema,
            current: BTreeMap::new(),
            next: 0,
        })
    }

    fn key_arrays(&self, rows: &RecordBatch) -> Vec<ArrayRef> {
        self.key_columns
            .iter()
            .map(|&i| rows.column(i).clone())
            .collect()
    }

    /// Replays a log entry (already normalised when it was written).
    pub fn replay(&mut self, changes: &Changes) -> Result<(), ArrowError> {
        let keys = self.keys.convert_columns(&self.key_arrays(&changes.rows))?;
        let rows = self.rows.convert_columns(changes.rows.columns())?;
        for i in 0..changes.rows.num_rows() {
            let key = keys.row(i).owned();
            if op::retracts(changes.op(i)) {
                self.current.remove(&key);
            } else {
                self.current.insert(key, rows.row(i).owned());
            }
        }
        Ok(())
    }

    /// Applies `changes` and returns what the log must record for them: an addition of a
    /// key that exists first retracts the key's row (-U, then the addition as +U); a
    /// retraction takes away the key's current row, or nothing when the key is absent.
    pub fn normalise(&mut self, changes: &Changes) -> Result<Changes, ArrowError> {
        let n = changes.rows.num_rows();
        let keys = self.keys.convert_columns(&self.key_arrays(&changes.rows))?;
        let rows = self.rows.convert_columns(changes.rows.columns())?;
        let mut out = self.rows.empty_rows(n, 0);
        let mut ops = Vec::with_capacity(n);
        for i in 0..n {
            let key = keys.row(i).owned();
            let code = changes.op(i);
            if op::retracts(code) {
                if let Some(old) = self.current.remove(&key) {
                    out.push(old.row());
                    ops.push(code);
                }
                continue;
            }
            let new = rows.row(i).owned();
            match self.current.insert(key, new) {
                Some(old) => {
                    out.push(old.row());
                    ops.push(op::UPDATE_BEFORE);
                    out.push(rows.row(i));
                    ops.push(op::UPDATE_AFTER);
                }
                None => {
                    out.push(rows.row(i));
                    ops.push(code);
                }
            }
        }
        let columns = self.rows.convert_rows(out.iter())?;
        let rows = batch(&self.schema, columns, ops.len())?;
        let ops = ops
            .iter()
            .any(|&o| o != op::INSERT)
            .then(|| Int8Array::from(ops));
        Ok(Changes { rows, ops })
    }

    /// The current rows in key order, in batches of up to [`CHUNK`] rows.
    pub fn current(&self) -> Result<Vec<RecordBatch>, ArrowError> {
        let rows: Vec<&OwnedRow> = self.current.values().collect();
        rows.chunks(CHUNK)
            .map(|chunk| {
                let columns = self.rows.convert_rows(chunk.iter().map(|r| r.row()))?;
                batch(&self.schema, columns, chunk.len())
            })
            .collect()
    }
}

fn batch(
    schema: &SchemaRef,
    columns: Vec<ArrayRef>,
    rows: usize,
) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array, StringArray};

    use super::*;
    use crate::table_def::{ColumnDef, TableId};
    use crate::types::SqlType;

    pub(crate) fn keyed_table() -> TableDef {
        TableDef {
            id: TableId(3),
            name: "kv".into(),
            columns: vec![
                ColumnDef {
                    name: "v".into(),
                    data_type: SqlType::Varchar(None),
                    nullable: true,
                    metadata: None,
                },
                ColumnDef {
                    name: "k".into(),
                    data_type: SqlType::BigInt,
                    nullable: false,
                    metadata: None,
                },
            ],
            computed: vec![],
            primary_key: vec!["k".into()],
            watermark: None,
            options: BTreeMap::new(),
        }
    }

    pub(crate) fn changes(def: &TableDef, rows: &[(&str, i64)], ops: Option<Vec<i8>>) -> Changes {
        let batch = RecordBatch::try_new(
            def.physical_schema(),
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
            ],
        )
        .unwrap();
        Changes {
            rows: batch,
            ops: ops.map(Int8Array::from),
        }
    }

    /// (op, v, k) of each row.
    pub(crate) fn listed(c: &Changes) -> Vec<(i8, String, i64)> {
        let v = c
            .rows
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let k = c
            .rows
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        (0..c.rows.num_rows())
            .map(|i| (c.op(i), v.value(i).to_string(), k.value(i)))
            .collect()
    }

    fn current(index: &KeyedRows) -> Vec<(String, i64)> {
        index
            .current()
            .unwrap()
            .iter()
            .flat_map(|b| {
                listed(&Changes {
                    rows: b.clone(),
                    ops: None,
                })
                .into_iter()
                .map(|(_, v, k)| (v, k))
            })
            .collect()
    }

    #[test]
    fn inserts_of_existing_keys_replace_and_retractions_take_the_current_row() {
        let def = keyed_table();
        let mut index = KeyedRows::new(&def).unwrap();
        let first = index
            .normalise(&changes(&def, &[("a", 2), ("b", 1), ("c", 2)], None))
            .unwrap();
        assert_eq!(
            listed(&first),
            vec![
                (op::INSERT, "a".into(), 2),
                (op::INSERT, "b".into(), 1),
                (op::UPDATE_BEFORE, "a".into(), 2),
                (op::UPDATE_AFTER, "c".into(), 2),
            ]
        );
        assert_eq!(current(&index), vec![("b".into(), 1), ("c".into(), 2)]);

        // A retraction names the key; the row the log takes away is the current one.
        let out = index
            .normalise(&changes(
                &def,
                &[("stale", 2), ("d", 2), ("x", 9), ("gone", 1)],
                Some(vec![
                    op::UPDATE_BEFORE,
                    op::UPDATE_AFTER,
                    op::DELETE,
                    op::DELETE,
                ]),
            ))
            .unwrap();
        assert_eq!(
            listed(&out),
            vec![
                (op::UPDATE_BEFORE, "c".into(), 2),
                (op::UPDATE_AFTER, "d".into(), 2),
                (op::DELETE, "b".into(), 1),
            ]
        );
        assert_eq!(current(&index), vec![("d".into(), 2)]);

        // Replaying the normalised log gives the same rows.
        let mut replayed = KeyedRows::new(&def).unwrap();
        replayed.replay(&first).unwrap();
        replayed.replay(&out).unwrap();
        assert_eq!(current(&replayed), current(&index));
    }

    #[test]
    fn only_inserts_need_no_ops() {
        let def = keyed_table();
        let mut index = KeyedRows::new(&def).unwrap();
        let out = index
            .normalise(&changes(&def, &[("a", 1), ("b", 2)], None))
            .unwrap();
        assert!(out.ops.is_none());
        assert_eq!(current(&index).len(), 2);
    }
}
