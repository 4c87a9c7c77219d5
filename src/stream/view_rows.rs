//! An updating view's rows: a counted multiset that each publish changes in place, at
//! the cost of the changes rather than of the view, turned into batches when read.
//!
//! Rows keep the order they were first seen in (a row retracted to nothing and added
//! again later goes last), as rebuilding the rows at every publish gave them. Rows added
//! while nothing is retracted are kept as their batches and counted only when a
//! retraction comes, so a view that only grows costs what it appends.

use std::hash::BuildHasher;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::RowConverter;
use datafusion::common::Result;
use hashbrown::{DefaultHashBuilder, HashTable};

use super::message::ChangeBatch;

/// Rows in a batch when the view is read.
const BATCH_ROWS: usize = 8192;

/// What a row costs besides its bytes: its slot and index entry.
const ENTRY_BYTES: usize = 40;

/// Slots of gone rows tolerated before the slots are compacted (and at most as many as
/// there are rows).
const GONE_SLACK: usize = 4096;

/// A row held, and how many times it is present.
struct Slot {
    bytes: Box<[u8]>,
    count: i64,
}

pub struct UpdatingRows {
    schema: SchemaRef,
    converter: RowConverter,
    /// Rows in the order they were first seen; a row gone leaves `None` until the slots
    /// are compacted (a map ordered by arrival number cost a tree walk per row).
    slots: Vec<Option<Slot>>,
    /// The slot of every row held, found by the row's bytes.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Slots left `None`.
    gone: usize,
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
            slots: Vec::new(),
            index: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            gone: 0,
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
        let mut retracted: Vec<u32> = Vec::new();
        for change in changes {
            self.count(change, &mut retracted)?;
        }
        for slot in retracted {
            let Some(held) = &self.slots[slot as usize] else {
                continue;
            };
            if held.count <= 0 {
                let hash = self.hasher.hash_one(&held.bytes);
                if let Ok(entry) = self.index.find_entry(hash, |&s| s == slot) {
                    entry.remove();
                }
                self.bytes -= held.bytes.len() + ENTRY_BYTES;
                self.slots[slot as usize] = None;
                self.gone += 1;
            }
        }
        if self.gone > GONE_SLACK && self.gone > self.slots.len() - self.gone {
            self.compact_slots();
        }
        self.batches = None;
        Ok(())
    }

    /// Counts the rows of `change` in, noting the slots of those it retracts.
    fn count(&mut self, change: &ChangeBatch, retracted: &mut Vec<u32>) -> Result<()> {
        let rows = self.converter.convert_columns(change.rows.columns())?;
        for (i, row) in rows.iter().enumerate() {
            let bytes = row.as_ref();
            let hash = self.hasher.hash_one(bytes);
            let slots = &mut self.slots;
            let found = self.index.find(hash, |&s| {
                slots[s as usize]
                    .as_ref()
                    .is_some_and(|held| *held.bytes == *bytes)
            });
            let slot = match found {
                Some(&slot) => slot,
                None => {
                    let slot = slots.len() as u32;
                    slots.push(Some(Slot {
                        bytes: bytes.into(),
                        count: 0,
                    }));
                    self.bytes += bytes.len() + ENTRY_BYTES;
                    let hasher = &self.hasher;
                    self.index.insert_unique(hash, slot, |&s| {
                        hasher.hash_one(&slots[s as usize].as_ref().expect("indexed").bytes)
                    });
                    slot
                }
            };
            let delta = if change.retracts(i) {
                retracted.push(slot);
                -1
            } else {
                1
            };
            let held = slots[slot as usize].as_mut().expect("indexed");
            let before = held.count.max(0) as usize;
            held.count += delta;
            self.rows = self.rows + held.count.max(0) as usize - before;
        }
        Ok(())
    }

    /// Drops the slots of gone rows, keeping the others' order.
    fn compact_slots(&mut self) {
        let mut moved = vec![u32::MAX; self.slots.len()];
        let mut kept = Vec::with_capacity(self.slots.len() - self.gone);
        for (old, slot) in std::mem::take(&mut self.slots).into_iter().enumerate() {
            if let Some(slot) = slot {
                moved[old] = kept.len() as u32;
                kept.push(Some(slot));
            }
        }
        for slot in self.index.iter_mut() {
            *slot = moved[*slot as usize];
        }
        self.slots = kept;
        self.gone = 0;
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
        for held in self.slots.iter().flatten() {
            for _ in 0..held.count {
                rows.push(parser.parse(&held.bytes));
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
    use std::sync::Arc;

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

    /// Applies `publish` to `rows` and to `rebuilt` (the rows rebuilt from the changelog
    /// at each publish), and checks both hold the same rows in the same order.
    fn apply_as_a_rebuild_would(
        rows: &mut UpdatingRows,
        rebuilt: &mut Vec<RecordBatch>,
        publish: Vec<ChangeBatch>,
    ) {
        rows.apply(&publish).unwrap();
        let before = std::mem::take(rebuilt);
        *rebuilt = crate::stream::changelog::apply(&schema(), before, publish).unwrap();
        let expected = crate::stream::message::change_lines(
            &rebuilt
                .iter()
                .cloned()
                .map(ChangeBatch::new)
                .collect::<Vec<_>>(),
        );
        assert_eq!(lines(rows), expected);
        assert_eq!(rows.rows(), expected.len());
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
        let mut rows = UpdatingRows::new(&schema()).unwrap();
        let mut rebuilt: Vec<RecordBatch> = vec![];
        for publish in publishes {
            apply_as_a_rebuild_would(&mut rows, &mut rebuilt, publish);
        }
        assert_eq!(lines(&mut rows), ["+I b,1", "+I a,2"]);
        assert!(rows.bytes() > 0);
        rows.apply(&[change(&[("b", 1, Delete), ("a", 2, Delete)])])
            .unwrap();
        assert_eq!((rows.rows(), rows.bytes()), (0, 0));
        assert!(lines(&mut rows).is_empty());
    }

    /// Enough rows go that their slots are compacted, twice: the rows and their order
    /// stay those of a rebuild, and rows found through the index after a compaction are
    /// the right ones.
    #[test]
    fn gone_rows_free_their_slots_in_order() {
        use Op::*;
        let keys: Vec<String> = (0..12_000).map(|k| format!("k{k}")).collect();
        let key = |k: usize| keys[k].as_str();
        let mut publishes = vec![vec![change(
            &(0..12_000).map(|k| (key(k), 0, Insert)).collect::<Vec<_>>(),
        )]];
        for round in 1..=6 {
            // Every other key's value changes; every third key goes and comes back last.
            let mut rows: Vec<(&str, i64, Op)> = Vec::new();
            for k in (0..12_000).filter(|k| k % 2 == 0) {
                rows.push((key(k), round - 1, UpdateBefore));
                rows.push((key(k), round, UpdateAfter));
            }
            publishes.push(vec![change(&rows)]);
        }
        publishes.push(vec![change(
            &(0..12_000)
                .filter(|k| k % 3 == 0)
                .map(|k| (key(k), if k % 2 == 0 { 6 } else { 0 }, Delete))
                .collect::<Vec<_>>(),
        )]);
        publishes.push(vec![change(
            &(0..12_000)
                .filter(|k| k % 3 == 0)
                .map(|k| (key(k), 9, Insert))
                .collect::<Vec<_>>(),
        )]);
        let mut rows = UpdatingRows::new(&schema()).unwrap();
        let mut rebuilt: Vec<RecordBatch> = vec![];
        let mut compactions = 0;
        for publish in publishes {
            let slots = rows.slots.len();
            apply_as_a_rebuild_would(&mut rows, &mut rebuilt, publish);
            compactions += (rows.slots.len() < slots) as usize;
        }
        assert!(compactions >= 2, "{compactions} compactions");
        // The last publish only inserts: its rows wait as batches, uncounted.
        let held = (rows.slots.len(), rows.gone, rows.index.len());
        assert_eq!(held, (12_000, 4_000, 8_000));
    }
}
