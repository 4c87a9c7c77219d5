//! An updating view's rows: a counted multiset that each publish changes in place, at
//! the cost of the changes rather than of the view, turned into batches when read.
//!
//! Rows keep the order they were first seen in (a row retracted to nothing and added
//! again later goes last), as rebuilding the rows at every publish gave them. Rows added
//! while nothing is retracted are kept as their batches and counted only when a
//! retraction comes, so a view that only grows costs what it appends.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::RowConverter;
use datafusion::common::hash_map::EntryRef;
use datafusion::common::{HashMap, Result};

use super::message::ChangeBatch;

/// Rows in a batch when the view is read.
const BATCH_ROWS: usize = 8192;

/// What a row costs besides its bytes: its map and order entries.
const ENTRY_BYTES: usize = 64;

pub struct UpdatingRows {
    schema: SchemaRef,
    converter: RowConverter,
    /// Row bytes -> (place in the order, how many times the row is present).
    counts: HashMap<Arc<[u8]>, (u64, i64)>,
    order: BTreeMap<u64, Arc<[u8]>>,
    next: u64,
    rows: usize,
    bytes: usize,
    /// Rows added since the last retraction, not counted yet (they follow the others).
    appended: Vec<RecordBatch>,
    /// The rows as batches, until they change.
    batches: Option<Vec<RecordBatch>>,
}

impl UpdatingRows {
    pub fn new(schema: &SchemaRef) -> Result<Self> {
        Ok(Self {
            schema: schema.clone(),
            converter: super::row_converter(schema.fields())?,
            counts: HashMap::default(),
            order: BTreeMap::new(),
            next: 0,
            rows: 0,
            bytes: 0,
            appended: Vec::new(),
            batches: Some(vec![]),
        })
    }

    /// Inserts add a row, retractions take an equal one away. Within one call they
    /// cancel in any order; a row retracted more often than it is present is gone.
    pub fn apply(&mut self, changes: &[ChangeBatch]) -> Result<()> {
        if !changes.iter().any(ChangeBatch::retracts_any) {
            for change in changes {
                self.rows += change.num_rows();
                self.bytes += change.rows.get_array_memory_size();
                self.appended.push(change.rows.clone());
                if let Some(batches) = &mut self.batches {
                    batches.push(change.rows.clone());
                }
            }
            return Ok(());
        }
        for batch in std::mem::take(&mut self.appended) {
            self.bytes -= batch.get_array_memory_size();
            self.rows -= batch.num_rows();
            self.count(&ChangeBatch::new(batch), &mut vec![])?;
        }
        // Rows a retraction may have left at nothing or less: looked at once all is in.
        let mut retracted: Vec<Arc<[u8]>> = Vec::new();
        for change in changes {
            self.count(change, &mut retracted)?;
        }
        for bytes in retracted {
            if let Some(&(at, count)) = self.counts.get(&bytes) {
                if count <= 0 {
                    self.counts.remove(&bytes);
                    self.order.remove(&at);
                    self.bytes -= bytes.len() + ENTRY_BYTES;
                }
            }
        }
        self.batches = None;
        Ok(())
    }

    /// Counts the rows of `change` in, noting those it retracts.
    fn count(&mut self, change: &ChangeBatch, retracted: &mut Vec<Arc<[u8]>>) -> Result<()> {
        let rows = self.converter.convert_columns(change.rows.columns())?;
        for (i, row) in rows.iter().enumerate() {
            let delta = if change.retracts(i) { -1 } else { 1 };
            let entry = match self.counts.entry_ref(row.as_ref()) {
                EntryRef::Occupied(entry) => entry,
                EntryRef::Vacant(entry) => {
                    let bytes: Arc<[u8]> = row.as_ref().into();
                    self.bytes += bytes.len() + ENTRY_BYTES;
                    self.order.insert(self.next, bytes.clone());
                    let entry = entry.insert_entry_with_key(bytes, (self.next, 0));
                    self.next += 1;
                    entry
                }
            };
            if delta < 0 {
                retracted.push(entry.key().clone());
            }
            let (_, count) = entry.into_mut();
            let before = (*count).max(0) as usize;
            *count += delta;
            self.rows = self.rows + (*count).max(0) as usize - before;
        }
        Ok(())
    }

    /// Rows present, counted as often as they are.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held, roughly.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The rows as batches, if they were built since they last changed.
    pub fn built(&self) -> Option<Vec<RecordBatch>> {
        self.batches.clone()
    }

    /// The rows, in order, as batches.
    pub fn batches(&mut self) -> Result<Vec<RecordBatch>> {
        if let Some(batches) = &self.batches {
            return Ok(batches.clone());
        }
        let parser = self.converter.parser();
        let mut batches = Vec::new();
        let mut rows = Vec::with_capacity(BATCH_ROWS);
        let mut flush = |rows: &mut Vec<_>| -> Result<()> {
            if !rows.is_empty() {
                let n = rows.len();
                let columns = self.converter.convert_rows(rows.drain(..))?;
                batches.push(super::batch_of(self.schema.clone(), columns, n)?);
            }
            Ok(())
        };
        for bytes in self.order.values() {
            let count = self.counts[bytes].1;
            for _ in 0..count {
                rows.push(parser.parse(bytes));
                if rows.len() == BATCH_ROWS {
                    flush(&mut rows)?;
                }
            }
        }
        flush(&mut rows)?;
        batches.extend(self.appended.iter().cloned());
        self.batches = Some(batches.clone());
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::message::Op;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    fn change(rows: &[(&str, i64, Op)]) -> ChangeBatch {
        ChangeBatch {
            rows: RecordBatch::try_new(
                schema(),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                ],
            )
            .unwrap(),
            watermarks: None,
            ops: Some(datafusion::arrow::array::Int8Array::from_iter_values(
                rows.iter().map(|r| r.2 as i8),
            )),
        }
    }

    fn lines(rows: &mut UpdatingRows) -> Vec<String> {
        crate::stream::message::change_lines(
            &rows
                .batches()
                .unwrap()
                .into_iter()
                .map(ChangeBatch::new)
                .collect::<Vec<_>>(),
        )
    }

    /// The same rows, in the same order, as applying the whole changelog to the rows
    /// from scratch gives.
    #[test]
    fn applies_changes_in_place_as_a_rebuild_would() {
        use Op::*;
        let publishes = vec![
            vec![change(&[
                ("a", 1, Insert),
                ("b", 1, Insert),
                ("b", 1, Insert),
            ])],
            // b loses one copy; a is replaced; c comes and goes in the same publish.
            vec![change(&[
                ("b", 1, Delete),
                ("a", 1, UpdateBefore),
                ("a", 2, UpdateAfter),
                ("c", 1, Insert),
                ("c", 1, Delete),
            ])],
            // A retraction of a row not there is forgotten; a row retracted then added
            // back in one publish keeps its place; one gone before comes back last.
            vec![
                change(&[("z", 9, Delete), ("b", 1, Delete)]),
                change(&[("b", 1, Insert), ("a", 2, Delete)]),
            ],
            vec![change(&[("a", 2, Insert)])],
        ];
        let schema = schema();
        let mut rows = UpdatingRows::new(&schema).unwrap();
        let mut rebuilt: Vec<RecordBatch> = vec![];
        for publish in publishes {
            rows.apply(&publish).unwrap();
            rebuilt = crate::stream::changelog::apply(&schema, rebuilt, publish).unwrap();
            let expected = crate::stream::message::change_lines(
                &rebuilt
                    .iter()
                    .cloned()
                    .map(ChangeBatch::new)
                    .collect::<Vec<_>>(),
            );
            assert_eq!(lines(&mut rows), expected);
            assert_eq!(rows.rows(), expected.len());
        }
        assert_eq!(lines(&mut rows), ["+I b,1", "+I a,2"]);
        assert!(rows.bytes() > 0);
        rows.apply(&[change(&[("b", 1, Delete), ("a", 2, Delete)])])
            .unwrap();
        assert_eq!((rows.rows(), rows.bytes()), (0, 0));
        assert!(lines(&mut rows).is_empty());
    }
}
