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

use datafusion::arrow::array::{ArrayRef, Int8Array, UInt64Array};
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::common::Result;
use datafusion::physical_expr::PhysicalExpr;

use crate::stream::message::{ChangeBatch, Op};
use crate::stream::operator::Operator;

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
        let row_converter = RowConverter::new(
            input
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
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
        let mut top = Vec::with_capacity(self.limit);
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
