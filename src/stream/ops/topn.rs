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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{ArrayRef, BinaryArray, Int64Array, Int8Array, UInt64Array};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use crate::stream::message::{ChangeBatch, Op};
use crate::stream::operator::Operator;
use crate::stream::snapshot;

/// A sort key of the TopN: an expression and its direction.
pub struct SortKey {
    pub expr: Arc<dyn PhysicalExpr>,
    pub options: SortOptions,
}

#[derive(Default)]
struct Partition {
    /// (sort key, row) -> how many times the row is present.
    rows: BTreeMap<(OwnedRow, OwnedRow), i64>,
    /// The rows last emitted, by rank - 1.
    emitted: Vec<OwnedRow>,
    touched: Option<Instant>,
}

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
    row_converter: RowConverter,
    partitions: HashMap<OwnedRow, Partition>,
    changed: HashSet<OwnedRow>,
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
        let row_converter = crate::stream::row_converter(input.fields())?;
        Ok(Self {
            partition_by,
            order_by,
            limit,
            schema,
            retracting,
            ttl,
            partition_converter,
            sort_converter,
            row_converter,
            partitions: HashMap::new(),
            changed: HashSet::new(),
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
    fn top(&self, partition: &Partition) -> Vec<OwnedRow> {
        let mut top = Vec::with_capacity(self.limit.min(partition.rows.len()));
        'rows: for ((_, row), &count) in &partition.rows {
            for _ in 0..count.max(0) {
                if top.len() == self.limit {
                    break 'rows;
                }
                top.push(row.clone());
            }
        }
        top
    }

    fn emit(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if let Some(ttl) = self.ttl {
            let now = Instant::now();
            let changed = &self.changed;
            self.partitions.retain(|key, p| {
                changed.contains(key) || p.touched.is_some_and(|t| now.duration_since(t) < ttl)
            });
        }
        let mut old: Vec<(OwnedRow, u64, Op)> = Vec::new();
        let mut new: Vec<(OwnedRow, u64, Op)> = Vec::new();
        let mut changed: Vec<OwnedRow> = self.changed.drain().collect();
        changed.sort();
        for key in changed {
            let Some(partition) = self.partitions.get(&key) else {
                continue;
            };
            let top = self.top(partition);
            let before = &partition.emitted;
            for rank in 0..top.len().max(before.len()) {
                let number = rank as u64 + 1;
                match (before.get(rank), top.get(rank)) {
                    (Some(a), Some(b)) if a == b => {}
                    (Some(a), Some(b)) => {
                        old.push((a.clone(), number, Op::UpdateBefore));
                        new.push((b.clone(), number, Op::UpdateAfter));
                    }
                    (Some(a), None) => old.push((a.clone(), number, Op::Delete)),
                    (None, Some(b)) => new.push((b.clone(), number, Op::Insert)),
                    (None, None) => {}
                }
            }
            let partition = self.partitions.get_mut(&key).expect("present");
            if partition.rows.is_empty() {
                self.partitions.remove(&key);
            } else {
                partition.emitted = top;
            }
        }
        for rows in [old, new] {
            if rows.is_empty() {
                continue;
            }
            let mut columns = self
                .row_converter
                .convert_rows(rows.iter().map(|(r, _, _)| r.row()))?;
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
        _out: &mut Vec<ChangeBatch>,
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
        let full = self.row_converter.convert_columns(rows.columns())?;
        let now = Instant::now();
        for i in 0..rows.num_rows() {
            let key = keys.row(i).owned();
            let partition = self.partitions.entry(key.clone()).or_default();
            partition.touched = Some(now);
            let entry = (sorts.row(i).owned(), full.row(i).owned());
            let sign = if batch.retracts(i) { -1 } else { 1 };
            let count = partition.rows.entry(entry.clone()).or_insert(0);
            *count += sign;
            if *count == 0 {
                partition.rows.remove(&entry);
            }
            if !self.retracting {
                // Over inserts only, rows below the top N never rise again.
                let mut present: i64 = partition.rows.values().sum();
                while present > self.limit as i64 {
                    let mut last = partition.rows.last_entry().expect("rows present");
                    let count = last.get_mut();
                    let excess = (present - self.limit as i64).min(*count);
                    *count -= excess;
                    present -= excess;
                    if *count == 0 {
                        last.remove();
                    }
                }
            }
            self.changed.insert(key);
        }
        Ok(())
    }

    fn on_barrier(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)
    }

    fn on_end(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)
    }

    /// `rows` (partition, sort key, row, count), `emitted` (partition, row, in rank
    /// order) and `changed` (partitions with unemitted changes) batches.
    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        let bytes = |rows: Vec<&OwnedRow>| -> ArrayRef {
            Arc::new(BinaryArray::from_iter_values(
                rows.into_iter().map(|r| r.as_ref().to_vec()),
            ))
        };
        let mut keys = Vec::new();
        let mut sorts = Vec::new();
        let mut full = Vec::new();
        let mut counts = Vec::new();
        let mut emitted_keys = Vec::new();
        let mut emitted = Vec::new();
        for (key, p) in &self.partitions {
            for ((sort, row), count) in &p.rows {
                keys.push(key);
                sorts.push(sort);
                full.push(row);
                counts.push(*count);
            }
            for row in &p.emitted {
                emitted_keys.push(key);
                emitted.push(row);
            }
        }
        Ok(vec![
            snapshot::batch(
                "rows",
                &[],
                vec![
                    bytes(keys),
                    bytes(sorts),
                    bytes(full),
                    Arc::new(Int64Array::from(counts)),
                ],
            )?,
            snapshot::batch("emitted", &[], vec![bytes(emitted_keys), bytes(emitted)])?,
            snapshot::batch("changed", &[], vec![bytes(self.changed.iter().collect())])?,
        ])
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let (_, _, columns) = snapshot::parts(batch, 0)?;
        let keys = columns[0]
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| DataFusionError::Internal("a TopN state column".into()))?;
        let parser = self.partition_converter.parser();
        Ok(Some(self.partition_converter.convert_rows(
            (0..batch.num_rows()).map(|i| parser.parse(keys.value(i))),
        )?))
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        let now = Instant::now();
        for batch in state {
            let (kind, _, columns) = snapshot::parts(&batch, 0)?;
            let binary = |i: usize| -> Result<&BinaryArray> {
                columns[i]
                    .as_any()
                    .downcast_ref::<BinaryArray>()
                    .ok_or_else(|| DataFusionError::Internal("a TopN state column".into()))
            };
            let keys = self.partition_converter.parser();
            for i in 0..batch.num_rows() {
                let key = keys.parse(binary(0)?.value(i)).owned();
                match kind.as_str() {
                    "rows" => {
                        let sort = self
                            .sort_converter
                            .parser()
                            .parse(binary(1)?.value(i))
                            .owned();
                        let row = self
                            .row_converter
                            .parser()
                            .parse(binary(2)?.value(i))
                            .owned();
                        let count = columns[3]
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .ok_or_else(|| DataFusionError::Internal("a TopN count".into()))?
                            .value(i);
                        let p = self.partitions.entry(key).or_default();
                        p.touched = Some(now);
                        p.rows.insert((sort, row), count);
                    }
                    "emitted" => {
                        let row = self
                            .row_converter
                            .parser()
                            .parse(binary(1)?.value(i))
                            .owned();
                        self.partitions.entry(key).or_default().emitted.push(row);
                    }
                    _ => {
                        self.changed.insert(key);
                    }
                }
            }
        }
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.partitions
            .iter()
            .map(|(k, p)| {
                k.as_ref().len()
                    + p.rows
                        .keys()
                        .map(|(s, r)| s.as_ref().len() + r.as_ref().len() + 64)
                        .sum::<usize>()
                    + p.emitted
                        .iter()
                        .map(|r| r.as_ref().len() + 32)
                        .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::Column;

    use super::*;

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

    fn lines(out: &[ChangeBatch]) -> Vec<String> {
        crate::stream::message::change_lines(out)
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
    fn over_inserts_only_the_top_rows_are_kept() {
        let mut op = operator(false);
        let mut out = Vec::new();
        let rows: Vec<(&str, i64, Op)> = (0..100).map(|i| ("go", i, Op::Insert)).collect();
        op.process(0, batch(&rows), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I go,99,1", "+I go,98,2"]);
        assert_eq!(
            op.partitions.values().map(|p| p.rows.len()).sum::<usize>(),
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
        restored.restore(original.snapshot().unwrap()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (op, out) in [(&mut original, &mut a), (&mut restored, &mut b)] {
            op.process(
                0,
                batch(&[("go", 7, Op::Delete), ("chess", 4, Op::Insert)]),
                out,
            )
            .unwrap();
            op.on_barrier(out).unwrap();
        }
        assert_eq!(lines(&a), lines(&b));
        assert_eq!(
            lines(&a),
            [
                "-U chess,3,1",
                "-U go,7,1",
                "+U chess,4,1",
                "+I chess,3,2",
                "+U go,6,1"
            ]
        );
    }
}
