//! TopN: `ROW_NUMBER() OVER (PARTITION BY p ORDER BY o) <= N` over an unbounded input,
//! and deduplication (N = 1, ordered by time ascending to keep the first row of a key,
//! descending to keep the last).
//!
//! Each partition keeps its rows ordered by the sort key (encoded with arrow's
//! RowConverter, so byte order is sort order). Over inserts only, rows that fall out of
//! the top N can never come back and are dropped at once; over a retracting input every
//! row is kept, since a retraction can pull a lower row up. Changes are folded for an
//! epoch and each changed partition emits, per rank, the row that left it (-U/-D) and
//! the row that took it (+U/+I) at the barrier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, Int8Array, UInt64Array};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::Result;
use datafusion::physical_expr::PhysicalExpr;
use smallvec::SmallVec;

use crate::stream::message::{ChangeBatch, Op};
use crate::stream::operator::{Operator, StateReader};

mod checkpoint;
mod partitions;
mod ranked;
mod spill;

use crate::stream::flat_rows::RowCodec;
use crate::stream::source::BATCH_SIZE;
use partitions::{Id, Partitions};
use ranked::{Entry, Ranked};

/// A sort key of the TopN: an expression and its direction.
pub struct SortKey {
    pub expr: Arc<dyn PhysicalExpr>,
    pub options: SortOptions,
}

/// A partition's emitted rows: one inline, as a dedup emits.
type Emitted = SmallVec<[Entry; 1]>;

#[derive(Default)]
struct Partition {
    rows: Ranked,
    /// How many rows are present (the sum of the counts in `rows`).
    present: i64,
    /// The rows last emitted, by rank - 1 (shared with `rows` while they are there).
    emitted: Emitted,
    touched: Option<Instant>,
    /// Listed in `TopN::changed`: it has changes not emitted yet.
    changed: bool,
    /// Listed in `TopN::dirty`: changed since the previous snapshot.
    dirty: bool,
    /// Had rows since the sled backend last looked for partitions to move out.
    used: bool,
    /// Under the sled backend: created since the previous move out (not brought back
    /// from disk), so unproven: such partitions go out first.
    created_since_shed: bool,
}

impl Partition {
    /// Its rows and emitted rows (entries shared), for a snapshot.
    fn frozen(&self) -> Partition {
        Partition {
            rows: self.rows.clone(),
            present: self.present,
            emitted: self.emitted.clone(),
            ..Partition::default()
        }
    }
}

/// A partition's own fields and its place in the index, beside its key and rows.
const PARTITION_OVERHEAD: usize = partitions::SLOT_BYTES;

/// How many partitions ahead a walk over listed slots asks for their rows' memory.
const PREFETCH_AHEAD: usize = 8;

/// An emitted row's slot (its bytes are shared with, and counted by, its entry).
const EMITTED_SLOT: usize = 16;

pub struct TopN {
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    order_by: Vec<SortKey>,
    limit: usize,
    /// Input columns then the row number.
    schema: SchemaRef,
    retracting: bool,
    ttl: Option<Duration>,
    partition_converter: RowConverter,
    sort_converter: RowConverter,
    /// Whole rows, as entries hold them.
    rows_codec: RowCodec,
    partitions: Partitions,
    /// Partitions with changes not emitted yet (slots that no longer hold such a
    /// partition are passed over: their `changed` flag says).
    changed: Vec<Id>,
    /// Partitions changed since the previous snapshot, possibly repeated (passed over
    /// as `changed`, by their `dirty` flag).
    dirty: Vec<Id>,
    /// Keys of partitions that left memory since the previous snapshot, gone or (under
    /// the sled backend) moved to disk with changes: the next snapshot resets them.
    gone: Vec<Arc<[u8]>>,
    /// Bytes of state held in memory, kept as rows come and go.
    bytes: usize,
    /// Partitions beyond the memory budget, under the sled backend.
    spill: Option<spill::Spill>,
    /// What the last snapshot took of the partitions in memory, encoded off the task.
    frozen: Option<checkpoint::Frozen>,
}

impl TopN {
    pub fn try_new(
        partition_by: Vec<Arc<dyn PhysicalExpr>>,
        order_by: Vec<SortKey>,
        limit: usize,
        input: SchemaRef,
        schema: SchemaRef,
        retracting: bool,
        ttl: Option<Duration>,
    ) -> Result<Self> {
        let partition_converter = RowConverter::new(
            partition_by
                .iter()
                .map(|e| Ok(SortField::new(e.data_type(&input)?)))
                .collect::<Result<Vec<_>>>()?,
        )?;
        let sort_converter = RowConverter::new(
            order_by
                .iter()
                .map(|k| {
                    Ok(SortField::new_with_options(
                        k.expr.data_type(&input)?,
                        k.options,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        )?;
        let rows_codec = RowCodec::new(input.fields())?;
        Ok(Self {
            partition_by,
            order_by,
            limit,
            schema,
            retracting,
            ttl,
            partition_converter,
            sort_converter,
            rows_codec,
            partitions: Partitions::default(),
            changed: Vec::new(),
            dirty: Vec::new(),
            gone: Vec::new(),
            bytes: 0,
            spill: None,
            frozen: None,
        })
    }

    fn columns(
        exprs: impl Iterator<Item = Arc<dyn PhysicalExpr>>,
        batch: &RecordBatch,
    ) -> Result<Vec<ArrayRef>> {
        exprs
            .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }

    /// The partition's current top rows, a row present twice taking two ranks.
    fn top(limit: usize, partition: &Partition) -> Emitted {
        let mut top = Emitted::with_capacity(limit.min(partition.present.max(0) as usize));
        'rows: for (entry, count) in partition.rows.iter() {
            for _ in 0..count.max(0) {
                if top.len() == limit {
                    break 'rows;
                }
                top.push(entry.clone());
            }
        }
        top
    }

    /// Lists slot `id` among the partitions changed since the previous snapshot.
    fn mark_dirty(dirty: &mut Vec<Id>, id: Id, partition: &mut Partition) {
        if !partition.dirty {
            partition.dirty = true;
            dirty.push(id);
        }
    }

    /// Drops partitions untouched for the state TTL.
    fn expire(&mut self) {
        let Some(ttl) = self.ttl else {
            return;
        };
        let now = Instant::now();
        let expired = self
            .partitions
            .slots_where(|p| !p.changed && p.touched.is_none_or(|t| now.duration_since(t) >= ttl));
        for id in expired {
            let (key, gone) = self.partitions.remove_at(id);
            self.bytes -= Self::partition_size(&key, &gone);
            self.gone.push(key);
        }
    }

    fn partition_size(key: &[u8], p: &Partition) -> usize {
        key.len()
            + PARTITION_OVERHEAD
            + p.rows.iter().map(|(e, _)| e.size()).sum::<usize>()
            + p.emitted.len() * EMITTED_SLOT
    }

    fn emit(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.expire();
        let mut old: Vec<(Entry, u64, Op)> = Vec::new();
        let mut new: Vec<(Entry, u64, Op)> = Vec::new();
        // Partitions emit in the order they first changed in the epoch: those new in it
        // were allocated in that order, so their state is read in address order.
        let changed = std::mem::take(&mut self.changed);
        for (i, &id) in changed.iter().enumerate() {
            if let Some(&ahead) = changed.get(i + PREFETCH_AHEAD) {
                self.partitions.prefetch(ahead);
            }
            let Some((_, partition)) = self.partitions.at_mut(id).filter(|(_, p)| p.changed) else {
                continue;
            };
            partition.changed = false;
            let top = Self::top(self.limit, partition);
            let before = &partition.emitted;
            let mut same = top.len() == before.len();
            for rank in 0..top.len().max(before.len()) {
                let number = rank as u64 + 1;
                match (before.get(rank), top.get(rank)) {
                    (Some(a), Some(b)) if a.same_row(b) => {}
                    (Some(a), Some(b)) => {
                        same = false;
                        old.push((a.clone(), number, Op::UpdateBefore));
                        new.push((b.clone(), number, Op::UpdateAfter));
                    }
                    (Some(a), None) => old.push((a.clone(), number, Op::Delete)),
                    (None, Some(b)) => new.push((b.clone(), number, Op::Insert)),
                    (None, None) => {}
                }
            }
            if partition.rows.is_empty() {
                let (key, gone) = self.partitions.remove_at(id);
                self.bytes -= Self::partition_size(&key, &gone);
                self.gone.push(key);
            } else if !same {
                self.bytes =
                    self.bytes + top.len() * EMITTED_SLOT - partition.emitted.len() * EMITTED_SLOT;
                partition.emitted = top;
                Self::mark_dirty(&mut self.dirty, id, partition);
            }
        }
        // In source-sized batches: one batch of a million changed rows would be
        // hundreds of MiB allocated fresh (zeroed by the kernel) at every barrier.
        for rows in old.chunks(BATCH_SIZE).chain(new.chunks(BATCH_SIZE)) {
            let mut columns = self
                .rows_codec
                .decode(rows.iter().map(|(r, _, _)| r.row()))?;
            columns.push(Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|(_, n, _)| *n),
            )));
            out.push(ChangeBatch {
                rows: crate::stream::batch_of(self.schema.clone(), columns, rows.len())?,
                watermarks: None,
                ops: Some(Int8Array::from_iter_values(
                    rows.iter().map(|(_, _, op)| *op as i8),
                )),
            });
        }
        Ok(())
    }
}

impl Operator for TopN {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let rows = &batch.rows;
        if rows.num_rows() == 0 {
            return Ok(());
        }
        let keys = self
            .partition_converter
            .convert_columns(&Self::columns(self.partition_by.iter().cloned(), rows)?)?;
        let sorts = self.sort_converter.convert_columns(&Self::columns(
            self.order_by.iter().map(|k| k.expr.clone()),
            rows,
        )?)?;
        let full = self.rows_codec.encode(rows.columns())?;
        let now = self.ttl.map(|_| Instant::now());
        let limit = self.limit as i64;
        if self.spill.is_some() {
            // The batch's partitions on disk come back at once, each run read once.
            let mut seen = std::collections::HashSet::new();
            let missing: Vec<&[u8]> = (0..rows.num_rows())
                .map(|i| keys.row(i).data())
                .filter(|k| !self.partitions.contains(k) && seen.insert(*k))
                .collect();
            self.bring_back_all(&missing)?;
        }
        for i in 0..rows.num_rows() {
            let key = keys.row(i);
            let (sort, row) = (sorts.row(i), full.row(i));
            // One lookup a row; the lists name the partition's slot.
            let (id, created, partition) =
                self.partitions.find_or_insert(key.as_ref(), || Partition {
                    created_since_shed: true,
                    ..Partition::default()
                });
            if created {
                self.bytes += key.as_ref().len() + PARTITION_OVERHEAD;
            }
            partition.used = true;
            let sign = if batch.retracts(i) { -1 } else { 1 };
            // Over inserts only, rows below the top N never rise again: a row that would
            // rank after a full partition's last changes nothing (and touches no more of
            // the partition's memory).
            if !self.retracting
                && partition.present >= limit
                && !partition.rows.before_last(sort.as_ref(), row.as_ref())
            {
                continue;
            }
            partition.touched = now;
            let added = partition.rows.add(sort.as_ref(), row.as_ref(), sign);
            self.bytes = (self.bytes as isize + added) as usize;
            partition.present += sign;
            if !self.retracting {
                while partition.present > limit {
                    let (removed, freed) = partition.rows.drop_last(partition.present - limit);
                    partition.present -= removed;
                    self.bytes -= freed;
                }
            }
            if !partition.changed {
                partition.changed = true;
                self.changed.push(id);
            }
            Self::mark_dirty(&mut self.dirty, id, partition);
        }
        if self
            .spill
            .as_ref()
            .is_some_and(|s| s.early_emit.is_passed(self.bytes))
        {
            self.shed_early(out)?;
        }
        Ok(())
    }

    fn on_barrier(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)?;
        self.shed()
    }

    fn on_end(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)
    }

    /// Nothing in the task's snapshot itself: the partitions are frozen, and encoded by
    /// the reader [`Operator::snapshot_beyond_memory`] gives.
    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.freeze_whole();
        Ok(vec![])
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        self.freeze_changes();
        Ok(Some(vec![]))
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        self.partition_keys(batch).map(Some)
    }

    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        self.frozen_snapshot(whole)
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        self.restore_layers(state)?;
        // Beyond the budget, each restored part goes to disk before the next is read.
        if self.spill.as_ref().is_some_and(|s| self.bytes > s.memory()) {
            self.move_all_to_disk()?;
        }
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.bytes + self.spill.as_ref().map_or(0, spill::Spill::bytes)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, BinaryArray, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::Column;

    use super::*;
    use crate::stream::operator::testing::snapshot_of;
    use crate::stream::snapshot;

    /// Top 2 scores per game: rows (game, score).
    fn operator(retracting: bool) -> TopN {
        let input: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("game", DataType::Utf8, false),
            Field::new("score", DataType::Int64, false),
        ]));
        let mut fields = input.fields().to_vec();
        fields.push(Arc::new(Field::new("rn", DataType::UInt64, false)));
        TopN::try_new(
            vec![Arc::new(Column::new("game", 0))],
            vec![SortKey {
                expr: Arc::new(Column::new("score", 1)),
                options: SortOptions {
                    descending: true,
                    nulls_first: true,
                },
            }],
            2,
            input,
            Arc::new(Schema::new(fields)),
            retracting,
            None,
        )
        .unwrap()
    }

    fn batch(rows: &[(&str, i64, Op)]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("game", DataType::Utf8, false),
            Field::new("score", DataType::Int64, false),
        ]));
        ChangeBatch {
            rows: RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                ],
            )
            .unwrap(),
            watermarks: None,
            ops: Some(Int8Array::from_iter_values(rows.iter().map(|r| r.2 as i8))),
        }
    }

    /// The row counts of a snapshot's batches of one kind, in order.
    fn rows_of(state: &[RecordBatch], kind: &str) -> Vec<usize> {
        state
            .iter()
            .filter(|b| snapshot::kind(b).unwrap() == kind)
            .map(|b| b.num_rows())
            .collect()
    }

    fn lines(out: &[ChangeBatch]) -> Vec<String> {
        crate::stream::message::change_lines(out)
    }

    /// A retracting operator restored from `layers`, holding as much state as `original`.
    fn restored_like(original: &TopN, layers: Vec<RecordBatch>) -> TopN {
        let mut restored = operator(true);
        restored.restore(layers).unwrap();
        assert_eq!(restored.state_size(), original.state_size());
        restored
    }

    /// What both operators emit for `rows` and a barrier, which must be the same.
    fn same_output(a: &mut TopN, b: &mut TopN, rows: &[(&str, i64, Op)]) -> Vec<String> {
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        for (op, out) in [(a, &mut out_a), (b, &mut out_b)] {
            op.process(0, batch(rows), out).unwrap();
            op.on_barrier(out).unwrap();
        }
        assert_eq!(lines(&out_a), lines(&out_b));
        lines(&out_a)
    }

    #[test]
    fn ranks_move_and_retractions_pull_lower_rows_up() {
        let mut op = operator(true);
        let mut out = Vec::new();
        op.process(
            0,
            batch(&[
                ("go", 5, Op::Insert),
                ("go", 9, Op::Insert),
                ("go", 1, Op::Insert),
            ]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I go,9,1", "+I go,5,2"]);
        out.clear();
        op.process(0, batch(&[("go", 9, Op::Delete)]), &mut out)
            .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(
            lines(&out),
            ["-U go,9,1", "-U go,5,2", "+U go,5,1", "+U go,1,2"]
        );
        out.clear();
        op.process(
            0,
            batch(&[("go", 5, Op::Delete), ("go", 1, Op::Delete)]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["-D go,5,1", "-D go,1,2"]);
        assert_eq!(op.state_size(), 0);
    }

    #[test]
    fn many_changed_partitions_emit_in_source_sized_batches() {
        let mut op = operator(true);
        let mut out = Vec::new();
        let games: Vec<String> = (0..BATCH_SIZE + 10).map(|i| format!("g{i}")).collect();
        let rows = |op: Op| -> Vec<(&str, i64, Op)> {
            games.iter().map(|g| (g.as_str(), 1, op)).collect()
        };
        op.process(0, batch(&rows(Op::Insert)), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        let sizes: Vec<usize> = out.iter().map(|b| b.rows.num_rows()).collect();
        assert_eq!(sizes, [BATCH_SIZE, 10]);
        out.clear();
        // Retractions first, every partition's, then the rows that replace them.
        let mut changes = rows(Op::Delete);
        changes.extend(games.iter().map(|g| (g.as_str(), 2, Op::Insert)));
        op.process(0, batch(&changes), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        let sizes: Vec<usize> = out.iter().map(|b| b.rows.num_rows()).collect();
        assert_eq!(sizes, [BATCH_SIZE, 10, BATCH_SIZE, 10]);
        let lines = lines(&out);
        assert!(lines[..BATCH_SIZE + 10]
            .iter()
            .all(|l| l.starts_with("-U ") && l.ends_with(",1,1")));
        assert!(lines[BATCH_SIZE + 10..]
            .iter()
            .all(|l| l.starts_with("+U ") && l.ends_with(",2,1")));
    }

    #[test]
    fn over_inserts_only_the_top_rows_are_kept() {
        let mut op = operator(false);
        let mut out = Vec::new();
        let rows: Vec<(&str, i64, Op)> = (0..100).map(|i| ("go", i, Op::Insert)).collect();
        op.process(0, batch(&rows), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I go,99,1", "+I go,98,2"]);
        assert_eq!(
            op.partitions
                .values()
                .map(|p| p.rows.iter().count())
                .sum::<usize>(),
            2
        );
    }

    #[test]
    fn restored_state_gives_the_same_output() {
        let mut original = operator(true);
        let mut out = Vec::new();
        original
            .process(
                0,
                batch(&[
                    ("go", 5, Op::Insert),
                    ("chess", 3, Op::Insert),
                    ("go", 7, Op::Insert),
                ]),
                &mut out,
            )
            .unwrap();
        original.on_barrier(&mut out).unwrap();
        original
            .process(0, batch(&[("go", 6, Op::Insert)]), &mut out)
            .unwrap();
        let mut restored = operator(true);
        restored.restore(snapshot_of(&mut original, true)).unwrap();
        assert_eq!(
            same_output(
                &mut original,
                &mut restored,
                &[("go", 7, Op::Delete), ("chess", 4, Op::Insert)]
            ),
            [
                "-U go,7,1",
                "-U chess,3,1",
                "+U go,6,1",
                "+U chess,4,1",
                "+I chess,3,2"
            ]
        );
    }

    /// `batch` as written before rows were flat: `rows` and `emitted` without a header,
    /// their rows in arrow's row format.
    fn with_arrow_rows(op: &TopN, batch: &RecordBatch) -> RecordBatch {
        let kind = snapshot::kind(batch).unwrap();
        let row_column = match kind.as_str() {
            "rows" => 2,
            "emitted" => 1,
            _ => return batch.clone(),
        };
        let (_, head, mut columns) = snapshot::parts(batch, 1).unwrap();
        assert_eq!(head, [1], "flat rows say so");
        let rows = snapshot::column::<BinaryArray>(&columns, row_column).unwrap();
        let decoded = op
            .rows_codec
            .decode(rows.iter().map(Option::unwrap))
            .unwrap();
        let fields = &op.schema.fields()[..op.schema.fields().len() - 1];
        let arrow = RowCodec::Arrow(crate::stream::row_converter(fields).unwrap());
        let encoded = arrow.encode(&decoded).unwrap();
        columns[row_column] = snapshot::binary((0..rows.len()).map(|i| encoded.row(i)));
        snapshot::batch(&kind, &[], columns).unwrap()
    }

    #[test]
    fn snapshots_with_rows_in_arrows_row_format_restore_into_flat_rows() {
        let mut original = operator(true);
        assert!(original.rows_codec.is_flat());
        let mut out = Vec::new();
        let rows = [
            ("go", 5, Op::Insert),
            ("chess", 3, Op::Insert),
            ("go", 7, Op::Insert),
        ];
        original.process(0, batch(&rows), &mut out).unwrap();
        original.on_barrier(&mut out).unwrap();
        original
            .process(0, batch(&[("go", 6, Op::Insert)]), &mut out)
            .unwrap();
        let old: Vec<RecordBatch> = snapshot_of(&mut original, true)
            .iter()
            .map(|b| with_arrow_rows(&original, b))
            .collect();
        let mut restored = operator(true);
        restored.restore(old).unwrap();
        // Retracting a restored row finds it: its bytes are encoded as the operator's.
        assert_eq!(
            same_output(
                &mut original,
                &mut restored,
                &[("go", 7, Op::Delete), ("chess", 3, Op::Delete)]
            ),
            ["-U go,7,1", "-D chess,3,1", "+U go,6,1"]
        );
    }

    #[test]
    fn a_big_snapshot_comes_in_chunks_that_restore_as_one() {
        let games: Vec<String> = (0..70_000).map(|i| format!("g{i}")).collect();
        let rows: Vec<(&str, i64, Op)> = games
            .iter()
            .enumerate()
            .map(|(i, g)| (g.as_str(), i as i64, Op::Insert))
            .collect();
        let mut original = operator(false);
        let mut out = Vec::new();
        original.process(0, batch(&rows), &mut out).unwrap();
        original.on_barrier(&mut out).unwrap();
        let state = snapshot_of(&mut original, true);
        assert_eq!(rows_of(&state, "rows"), [65_536, 4_464]);
        assert_eq!(rows_of(&state, "emitted"), [0, 0]);
        assert_eq!(rows_of(&state, "emitted_top"), [65_536, 4_464]);
        assert_eq!(rows_of(&state, "changed"), [0]);
        let mut restored = operator(false);
        restored.restore(state).unwrap();
        assert_eq!(restored.state_size(), original.state_size());
        assert_eq!(
            same_output(
                &mut original,
                &mut restored,
                &[("g7", 100, Op::Insert), ("g69999", 1, Op::Insert)]
            ),
            ["-U g7,7,1", "+U g7,100,1", "+I g7,7,2", "+I g69999,1,2"]
        );
    }

    #[test]
    fn a_slot_freed_and_taken_by_another_partition_is_snapshotted_as_both() {
        let mut original = operator(true);
        let mut out = Vec::new();
        original
            .process(
                0,
                batch(&[("go", 5, Op::Insert), ("chess", 3, Op::Insert)]),
                &mut out,
            )
            .unwrap();
        original.on_barrier(&mut out).unwrap();
        let mut layers = snapshot_of(&mut original, true);
        let key = |op: &TopN, game: &str| {
            let column: ArrayRef = Arc::new(StringArray::from(vec![game]));
            let keys = op.partition_converter.convert_columns(&[column]).unwrap();
            op.partitions.find(keys.row(0).as_ref())
        };
        let go_slot = key(&original, "go").unwrap();
        // go empties and leaves at this barrier; poker, new after it, takes its slot
        // while both slot lists still name it from go's changes.
        original
            .process(0, batch(&[("go", 5, Op::Delete)]), &mut out)
            .unwrap();
        original.on_barrier(&mut out).unwrap();
        original
            .process(0, batch(&[("poker", 1, Op::Insert)]), &mut out)
            .unwrap();
        assert_eq!(key(&original, "poker"), Some(go_slot));
        assert_eq!(key(&original, "go"), None);
        let changes = snapshot_of(&mut original, false);
        // Reset: go and poker; rows: poker's once; poker's change is not emitted yet.
        assert_eq!(rows_of(&changes, "reset"), [2]);
        assert_eq!(rows_of(&changes, "rows"), [1]);
        assert_eq!(rows_of(&changes, "changed"), [1]);
        layers.extend(changes);
        let mut restored = restored_like(&original, layers);
        assert_eq!(
            same_output(
                &mut original,
                &mut restored,
                &[("go", 7, Op::Insert), ("chess", 3, Op::Delete)]
            ),
            ["-D chess,3,1", "+I poker,1,1", "+I go,7,1"]
        );
    }

    #[test]
    fn partitions_past_their_ttl_go_at_a_barrier_and_the_next_snapshot_resets_them() {
        let mut op = operator(true);
        op.ttl = Some(Duration::ZERO);
        let mut out = Vec::new();
        op.process(0, batch(&[("go", 5, Op::Insert)]), &mut out)
            .unwrap();
        // Changed partitions stay until emitted, however old.
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I go,5,1"]);
        snapshot_of(&mut op, true);
        out.clear();
        op.on_barrier(&mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!((op.partitions.len(), op.state_size()), (0, 0));
        let changes = snapshot_of(&mut op, false);
        assert_eq!(rows_of(&changes, "reset"), [1]);
        assert!(rows_of(&changes, "rows").is_empty());
        // A row of the expired key starts it afresh.
        op.process(0, batch(&[("go", 2, Op::Insert)]), &mut out)
            .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I go,2,1"]);
    }

    #[test]
    fn incremental_snapshots_hold_only_changed_partitions_and_restore_in_layers() {
        let mut original = operator(true);
        let mut out = Vec::new();
        let mut layers = Vec::new();
        original
            .process(
                0,
                batch(&[
                    ("go", 5, Op::Insert),
                    ("chess", 3, Op::Insert),
                    ("poker", 1, Op::Insert),
                ]),
                &mut out,
            )
            .unwrap();
        original.on_barrier(&mut out).unwrap();
        layers.extend(snapshot_of(&mut original, true));
        // Epoch 2 touches go (and chess leaves); poker is not written again. go's
        // emitted rows are its top two, named rather than written again.
        original
            .process(
                0,
                batch(&[("go", 8, Op::Insert), ("chess", 3, Op::Delete)]),
                &mut out,
            )
            .unwrap();
        original.on_barrier(&mut out).unwrap();
        let changes = snapshot_of(&mut original, false);
        let kinds: Vec<(String, usize)> = changes
            .iter()
            .map(|b| (snapshot::kind(b).unwrap(), b.num_rows()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("reset".to_string(), 2),
                ("rows".into(), 2),
                ("emitted".into(), 0),
                ("emitted_top".into(), 1),
                ("changed".into(), 0)
            ]
        );
        layers.extend(changes);
        // Epoch 3: chess comes back, and go (in the previous layer too) changes again;
        // the changes are left unemitted at the snapshot, so go's emitted rows are
        // written (its top is not what it emitted).
        original
            .process(
                0,
                batch(&[("chess", 9, Op::Insert), ("go", 6, Op::Insert)]),
                &mut out,
            )
            .unwrap();
        let changes = snapshot_of(&mut original, false);
        assert_eq!(rows_of(&changes, "emitted"), [2]);
        assert_eq!(rows_of(&changes, "emitted_top"), [0]);
        layers.extend(changes);
        let mut restored = restored_like(&original, layers);
        assert_eq!(
            same_output(
                &mut original,
                &mut restored,
                &[("go", 8, Op::Delete), ("poker", 2, Op::Insert)]
            ),
            [
                "-U go,8,1",
                "-U poker,1,1",
                "+I chess,9,1",
                "+U go,6,1",
                "+U poker,2,1",
                "+I poker,1,2",
            ]
        );
    }

    #[test]
    fn a_snapshot_is_encoded_off_the_task_as_of_its_barrier() {
        let later = [("go", 5, Op::Delete), ("go", 9, Op::Insert)];
        let mut original = operator(true);
        let mut out = Vec::new();
        let first = [("go", 5, Op::Insert), ("chess", 3, Op::Insert)];
        original.process(0, batch(&first), &mut out).unwrap();
        original.on_barrier(&mut out).unwrap();
        // The task's part of the snapshot holds no rows; the reader encodes them later.
        assert!(original.snapshot().unwrap().is_empty());
        let read = original.snapshot_beyond_memory(true).unwrap().unwrap();
        // Rows that come before the reader runs are not in this snapshot.
        original.process(0, batch(&later), &mut out).unwrap();
        let mut state = Vec::new();
        read(&mut |b| {
            state.push(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(rows_of(&state, "rows"), [2]);
        let mut restored = operator(true);
        restored.restore(state).unwrap();
        restored.restored().unwrap();
        restored.process(0, batch(&later), &mut Vec::new()).unwrap();
        assert_eq!(
            same_output(&mut original, &mut restored, &[("chess", 4, Op::Insert)]),
            [
                "-U go,5,1",
                "-U chess,3,1",
                "+U go,9,1",
                "+U chess,4,1",
                "+I chess,3,2"
            ]
        );
    }

    /// `operator`, under the sled state backend when `memory` (bytes) is given, where
    /// every look for unused partitions counts (no minimum idle time).
    fn operator_in(retracting: bool, memory: Option<usize>) -> TopN {
        let backend = memory.map(|memory| crate::stream::state_backend::SledBackend {
            root: std::env::temp_dir().join("weir-topn-tests"),
            memory,
        });
        let mut op = operator(retracting).with_backend(backend.as_ref()).unwrap();
        if let Some(spill) = op.spill.as_mut() {
            spill.idle = crate::stream::state_backend::IdleClock::new(Duration::ZERO);
        }
        op
    }

    /// Epochs of (game, score) rows: inserts, and (retracting) deletes of rows inserted
    /// before; game b loses all its rows.
    fn epochs(retracting: bool) -> Vec<Vec<(&'static str, i64, Op)>> {
        use Op::{Delete as D, Insert as I};
        let mut epochs = vec![
            vec![
                ("a", 1, I),
                ("b", 2, I),
                ("c", 3, I),
                ("a", 4, I),
                ("a", 5, I),
            ],
            vec![("a", 6, I), ("d", 1, I), ("b", 1, I)],
            vec![("b", 9, I), ("e", 2, I), ("c", 8, I)],
            vec![("c", 9, I), ("a", 0, I), ("f", 1, I), ("a", 7, I)],
        ];
        if retracting {
            epochs[2].push(("a", 6, D));
            epochs[3].extend([("b", 2, D), ("b", 9, D), ("b", 1, D), ("c", 9, D)]);
        }
        epochs
    }

    fn run_epoch(op: &mut TopN, rows: &[(&str, i64, Op)]) -> Vec<String> {
        let mut out = Vec::new();
        op.process(0, batch(rows), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        lines(&out)
    }

    #[test]
    fn the_sled_backend_keeps_partitions_beyond_memory_on_disk_and_brings_them_back() {
        for retracting in [false, true] {
            let mut plain = operator_in(retracting, None);
            let expected: Vec<Vec<String>> = epochs(retracting)
                .iter()
                .map(|e| run_epoch(&mut plain, e))
                .collect();
            for memory in [0, 300] {
                let mut op = operator_in(retracting, Some(memory));
                let mut seen = std::collections::HashSet::new();
                for (e, rows) in epochs(retracting).iter().enumerate() {
                    assert_eq!(
                        run_epoch(&mut op, rows),
                        expected[e],
                        "{retracting} {memory}"
                    );
                    let on_disk = op.spill.as_ref().unwrap().bytes();
                    // Partitions of earlier epochs: brought back from disk, used again.
                    let returned: std::collections::HashSet<&str> = rows
                        .iter()
                        .map(|r| r.0)
                        .filter(|k| seen.contains(k))
                        .collect();
                    seen.extend(rows.iter().map(|r| r.0));
                    // After a barrier only partitions brought back stay beyond the budget.
                    if memory == 0 {
                        assert!(op.partitions.len() <= returned.len());
                        assert!(on_disk > 0);
                    } else if returned.is_empty() {
                        assert!(op.bytes <= memory, "{}", op.bytes);
                    }
                    assert_eq!(op.state_size(), op.bytes + on_disk);
                }
            }
        }
    }

    #[test]
    fn partitions_brought_back_from_disk_stay_while_in_use() {
        use crate::stream::operator::testing::brought_back_state_stays_while_in_use;
        brought_back_state_stays_while_in_use(
            &mut operator_in(false, Some(0)),
            |op, rows| {
                let rows: Vec<_> = rows.iter().map(|&(k, v)| (k, v, Op::Insert)).collect();
                // Rising scores: each row enters its partition's top.
                assert!(!run_epoch(op, &rows).is_empty());
            },
            |op| (op.partitions.len(), op.spill.as_ref().unwrap().store_len()),
        );
    }

    #[test]
    fn partitions_that_outgrow_the_budget_between_barriers_emit_early_and_go_to_disk() {
        use crate::stream::operator::testing::leave_the_same_rows;
        use crate::stream::state_backend::EarlyEmitMark;
        for retracting in [false, true] {
            let mut plain = operator_in(retracting, None);
            let mut early = operator_in(retracting, Some(0));
            // Past what stayed in memory at all.
            early.spill.as_mut().unwrap().early_emit = EarlyEmitMark::with_slack(0, 0);
            // Changes go out before the barrier, and partitions a row did not use to
            // disk: only its partition stays.
            let row_by_row = epochs(retracting)
                .iter()
                .map(|rows| rows.iter().map(|row| batch(&[*row])).collect())
                .collect();
            leave_the_same_rows(&mut plain, &mut early, row_by_row, |op| {
                assert!(op.partitions.len() <= 1, "{}", op.partitions.len());
            });
        }
    }

    #[test]
    fn snapshots_under_the_sled_backend_restore_in_layers_into_either_backend() {
        for retracting in [false, true] {
            for (memory, restored_memory) in [
                (Some(0), Some(0)),
                (Some(0), None),
                (None, Some(0)),
                (Some(300), Some(300)),
            ] {
                let epochs = epochs(retracting);
                let mut original = operator_in(retracting, memory);
                run_epoch(&mut original, &epochs[0]);
                let mut layers = vec![snapshot_of(&mut original, true)];
                for rows in &epochs[1..3] {
                    run_epoch(&mut original, rows);
                    let changes = snapshot_of(&mut original, false);
                    // Only the partitions the epoch touched, wherever they are.
                    let reset: std::collections::HashSet<Vec<u8>> = changes
                        .iter()
                        .filter(|b| snapshot::kind(b).unwrap() == "reset")
                        .flat_map(|b| {
                            let (_, _, columns) = snapshot::parts(b, 0).unwrap();
                            let keys = snapshot::column::<datafusion::arrow::array::BinaryArray>(
                                &columns, 0,
                            )
                            .unwrap()
                            .clone();
                            keys.iter().map(|k| k.unwrap().to_vec()).collect::<Vec<_>>()
                        })
                        .collect();
                    let games: std::collections::HashSet<&str> = rows.iter().map(|r| r.0).collect();
                    assert_eq!(reset.len(), games.len(), "{memory:?}");
                    layers.push(changes);
                }
                let mut restored = operator_in(retracting, restored_memory);
                for layer in layers {
                    restored.restore(layer).unwrap();
                }
                restored.restored().unwrap();
                if restored_memory == Some(0) {
                    assert_eq!(restored.partitions.len(), 0);
                }
                assert_eq!(restored.state_size() > 0, original.state_size() > 0);
                assert_eq!(
                    run_epoch(&mut restored, &epochs[3]),
                    run_epoch(&mut original, &epochs[3]),
                    "retracting {retracting}, {memory:?} then {restored_memory:?}"
                );
            }
        }
    }

    #[test]
    fn a_changed_partition_that_goes_to_disk_twice_between_snapshots_is_in_the_next_one() {
        use Op::Insert as I;
        let mut original = operator_in(false, Some(0));
        run_epoch(&mut original, &[("k", 5, I), ("k", 6, I)]);
        let whole = snapshot_of(&mut original, true);
        // k changes and goes to disk; then comes back for a row below its top, which
        // changes nothing, and goes again.
        run_epoch(&mut original, &[("k", 8, I)]);
        run_epoch(&mut original, &[("k", 1, I)]);
        let changes = snapshot_of(&mut original, false);
        assert_eq!(rows_of(&changes, "rows"), [2]);
        let mut restored = operator_in(false, Some(0));
        restored.restore(whole).unwrap();
        restored.restore(changes).unwrap();
        restored.restored().unwrap();
        assert_eq!(
            run_epoch(&mut restored, &[("k", 7, I)]),
            run_epoch(&mut original, &[("k", 7, I)]),
        );
    }
}
