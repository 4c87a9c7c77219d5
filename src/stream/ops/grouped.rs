//! Grouped aggregation state on DataFusion's GroupValues and GroupsAccumulators: rows are
//! folded in a batch at a time, frozen into partial states (keys + accumulator states),
//! and partial states merge, so slices aggregate once and windows combine slices.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray};
use datafusion::arrow::compute::{filter, prep_null_mask_filter};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{Accumulator, EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

/// What to aggregate: group keys and aggregate calls, planned against the input.
pub struct AggregateCalls {
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    pub key_schema: SchemaRef,
    pub aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// FILTER (WHERE ...) of each aggregate.
    pub filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
}

impl AggregateCalls {
    pub fn new_state(&self) -> Result<Grouped> {
        Ok(Grouped {
            groups: new_group_values(self.key_schema.clone(), &GroupOrdering::None)?,
            accumulators: self.new_accumulators()?,
            indices: Vec::new(),
        })
    }

    /// A fresh state of one group.
    pub fn new_one_group(&self) -> Result<OneGroup> {
        Ok(OneGroup {
            accumulators: self
                .aggregates
                .iter()
                .map(|a| a.create_accumulator())
                .collect::<Result<_>>()?,
        })
    }

    /// One fresh accumulator per aggregate call.
    pub fn new_accumulators(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.aggregates.iter().map(accumulator_of).collect()
    }

    /// The argument columns of aggregate `i` over `batch`.
    pub fn arguments(&self, i: usize, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.aggregates[i]
            .expressions()
            .iter()
            .map(|e| e.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }

    /// Aggregate `i`'s FILTER (WHERE ...) over `batch`, nulls counting as false.
    pub fn filter(&self, i: usize, batch: &RecordBatch) -> Result<Option<BooleanArray>> {
        let Some(f) = &self.filters[i] else {
            return Ok(None);
        };
        let mask = f.evaluate(batch)?.into_array(batch.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| DataFusionError::Plan("FILTER must be boolean".into()))?;
        Ok(Some(if mask.null_count() > 0 {
            prep_null_mask_filter(mask)
        } else {
            mask.clone()
        }))
    }

    /// Key columns of `batch`.
    pub fn key_columns(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }
}

/// A fresh grouped accumulator of `agg` (DataFusion's row accumulators adapted when the
/// function has no grouped one).
pub fn accumulator_of(agg: &Arc<AggregateFunctionExpr>) -> Result<Box<dyn GroupsAccumulator>> {
    if agg.groups_accumulator_supported() {
        agg.create_groups_accumulator()
    } else {
        let agg = agg.clone();
        Ok(Box::new(GroupsAccumulatorAdapter::new(move || {
            agg.create_accumulator()
        })))
    }
}

/// Keys and accumulator states of a frozen group state.
#[derive(Debug, Clone)]
pub struct Partial {
    pub keys: Vec<ArrayRef>,
    pub states: Vec<Vec<ArrayRef>>,
}

impl Partial {
    /// Key columns then every accumulator's state columns.
    pub fn columns(&self) -> Vec<ArrayRef> {
        self.keys
            .iter()
            .chain(self.states.iter().flatten())
            .cloned()
            .collect()
    }

    /// The inverse of [`Partial::columns`] for the aggregates of `calls`.
    pub fn from_columns(calls: &AggregateCalls, columns: &[ArrayRef]) -> Result<Self> {
        let keys = calls.key_schema.fields().len();
        let mut at = keys;
        let mut states = Vec::new();
        for agg in &calls.aggregates {
            let n = agg.state_fields()?.len();
            states.push(
                columns
                    .get(at..at + n)
                    .ok_or_else(|| DataFusionError::Internal("state columns missing".into()))?
                    .to_vec(),
            );
            at += n;
        }
        Ok(Self {
            keys: columns[..keys].to_vec(),
            states,
        })
    }

    /// Bytes held (a partial read back from a checkpoint counts its own, not the
    /// message buffer it shares).
    pub fn size(&self) -> usize {
        self.keys
            .iter()
            .chain(self.states.iter().flatten())
            .map(|a| crate::stream::column_bytes(a.as_ref()))
            .sum()
    }
}

pub struct Grouped {
    groups: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    indices: Vec<usize>,
}

impl Grouped {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn size(&self) -> usize {
        self.groups.size() + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
    }

    /// Folds `batch` in; `keys` are its key columns.
    pub fn update(
        &mut self,
        calls: &AggregateCalls,
        keys: &[ArrayRef],
        batch: &RecordBatch,
    ) -> Result<()> {
        self.groups.intern(keys, &mut self.indices)?;
        let total = self.groups.len();
        for (i, acc) in self.accumulators.iter_mut().enumerate() {
            let args = calls.arguments(i, batch)?;
            let filter = calls.filter(i, batch)?;
            acc.update_batch(&args, &self.indices, filter.as_ref(), total)?;
        }
        Ok(())
    }

    /// Takes everything out as a partial state, leaving this empty.
    pub fn freeze(&mut self) -> Result<Partial> {
        let keys = self.groups.emit(EmitTo::All)?;
        let states = self
            .accumulators
            .iter_mut()
            .map(|a| a.state(EmitTo::All))
            .collect::<Result<Vec<_>>>()?;
        Ok(Partial { keys, states })
    }

    pub fn merge(&mut self, partial: &Partial) -> Result<()> {
        self.groups.intern(&partial.keys, &mut self.indices)?;
        let total = self.groups.len();
        for (acc, state) in self.accumulators.iter_mut().zip(&partial.states) {
            acc.merge_batch(state, &self.indices, total)?;
        }
        Ok(())
    }

    /// Final keys and aggregate values, one row per group.
    pub fn evaluate(&mut self) -> Result<(Vec<ArrayRef>, Vec<ArrayRef>)> {
        let keys = self.groups.emit(EmitTo::All)?;
        let values = self
            .accumulators
            .iter_mut()
            .map(|a| a.evaluate(EmitTo::All))
            .collect::<Result<Vec<_>>>()?;
        Ok((keys, values))
    }
}

/// The aggregate state of one group (a session's) on DataFusion's row accumulators: a
/// [`Grouped`] (hash table, vectors per call sized for many groups) took kilobytes for
/// one. Its states are those of the grouped accumulators, so the two merge each other's.
pub struct OneGroup {
    accumulators: Vec<Box<dyn Accumulator>>,
}

impl OneGroup {
    pub fn size(&self) -> usize {
        self.accumulators.iter().map(|a| a.size()).sum()
    }

    /// Folds every row of `batch` in.
    pub fn update(&mut self, calls: &AggregateCalls, batch: &RecordBatch) -> Result<()> {
        for (i, acc) in self.accumulators.iter_mut().enumerate() {
            let mut args = calls.arguments(i, batch)?;
            if let Some(mask) = calls.filter(i, batch)? {
                args = args
                    .iter()
                    .map(|a| filter(a, &mask))
                    .collect::<std::result::Result<_, _>>()?;
            }
            acc.update_batch(&args)?;
        }
        Ok(())
    }

    /// Merges partial states: each call's state columns.
    pub fn merge(&mut self, states: &[Vec<ArrayRef>]) -> Result<()> {
        for (acc, state) in self.accumulators.iter_mut().zip(states) {
            acc.merge_batch(state)?;
        }
        Ok(())
    }

    /// Each call's state columns, one row. The accumulators may be spent: go on with a
    /// new state that merges these.
    pub fn freeze(&mut self) -> Result<Vec<Vec<ArrayRef>>> {
        self.accumulators
            .iter_mut()
            .map(|a| {
                a.state()?
                    .into_iter()
                    .map(|v| v.to_array())
                    .collect::<Result<Vec<_>>>()
            })
            .collect()
    }

    /// Each call's final value; the accumulators may be spent.
    pub fn evaluate(&mut self) -> Result<Vec<ScalarValue>> {
        self.accumulators.iter_mut().map(|a| a.evaluate()).collect()
    }
}
