//! Grouped aggregation state on DataFusion's GroupValues and GroupsAccumulators: rows are
//! folded in a batch at a time, frozen into partial states (keys + accumulator states),
//! and partial states merge, so slices aggregate once and windows combine slices.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, UInt32Array};
use datafusion::arrow::compute::{filter, prep_null_mask_filter, take};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{Accumulator, EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use super::bigint_calls::BigintCall;

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
                .map(|a| match BigintCall::of(a) {
                    Some(call) => Ok(OneCall::Bigint(call)),
                    None => Ok(OneCall::Row(a.create_accumulator()?)),
                })
                .collect::<Result<_>>()?,
        })
    }

    /// Per call: whether its row accumulator's state survives `state()` (DataFusion 55's
    /// SUM, COUNT, AVG, MIN and MAX give their `evaluate` values, which must not consume:
    /// checked by `row_states_survive_being_read`); any other call's is built again.
    pub fn states_kept(&self) -> Vec<bool> {
        self.aggregates
            .iter()
            .map(|a| {
                !a.is_distinct()
                    && matches!(a.fun().name(), "sum" | "count" | "avg" | "min" | "max")
            })
            .collect()
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

    /// Row `row` of a partial state holding several groups.
    pub fn slice(&self, row: usize) -> Partial {
        let one = |columns: &[ArrayRef]| columns.iter().map(|c| c.slice(row, 1)).collect();
        Partial {
            keys: one(&self.keys),
            states: self.states.iter().map(|s| one(s)).collect(),
        }
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

/// Each aggregate call's argument columns and FILTER mask over a batch, evaluated once
/// for rows that go to many groups.
pub struct CallInputs {
    args: Vec<Vec<ArrayRef>>,
    filters: Vec<Option<BooleanArray>>,
}

impl CallInputs {
    /// Rows `indices` of these inputs, in that order.
    pub fn take(&self, indices: &UInt32Array) -> Result<CallInputs> {
        Ok(CallInputs {
            args: self
                .args
                .iter()
                .map(|args| {
                    args.iter()
                        .map(|a| take(a, indices, None))
                        .collect::<std::result::Result<Vec<_>, _>>()
                })
                .collect::<std::result::Result<_, _>>()?,
            filters: self
                .filters
                .iter()
                .map(|f| match f {
                    Some(mask) => Ok(Some(take(mask, indices, None)?.as_boolean().clone())),
                    None => Ok(None),
                })
                .collect::<Result<_>>()?,
        })
    }
}

impl AggregateCalls {
    pub fn inputs(&self, batch: &RecordBatch) -> Result<CallInputs> {
        let calls = 0..self.aggregates.len();
        Ok(CallInputs {
            args: calls
                .clone()
                .map(|i| self.arguments(i, batch))
                .collect::<Result<_>>()?,
            filters: calls
                .map(|i| self.filter(i, batch))
                .collect::<Result<_>>()?,
        })
    }
}

/// The aggregate state of one group (a session's) on DataFusion's row accumulators, or
/// plain numbers for COUNT and BIGINT's SUM, MIN and MAX: a [`Grouped`] (hash table,
/// vectors per call sized for many groups) took kilobytes for one. Its states are those
/// of the grouped accumulators, so the two merge each other's.
pub struct OneGroup {
    accumulators: Vec<OneCall>,
}

enum OneCall {
    Bigint(BigintCall),
    Row(Box<dyn Accumulator>),
}

impl OneGroup {
    pub fn size(&self) -> usize {
        self.accumulators
            .iter()
            .map(|a| match a {
                OneCall::Bigint(_) => std::mem::size_of::<OneCall>(),
                OneCall::Row(a) => a.size(),
            })
            .sum()
    }

    /// Folds in rows `offset..offset + len` of `inputs` (sessions take their rows of a
    /// batch's inputs put in session order, as ranges: slicing copies nothing).
    pub fn update_range(&mut self, inputs: &CallInputs, offset: usize, len: usize) -> Result<()> {
        for (acc, (args, mask)) in self
            .accumulators
            .iter_mut()
            .zip(inputs.args.iter().zip(&inputs.filters))
        {
            let acc = match acc {
                OneCall::Bigint(call) => {
                    call.update(&args[0], mask.as_ref(), offset, len)?;
                    continue;
                }
                OneCall::Row(acc) => acc,
            };
            let args: Vec<ArrayRef> = args.iter().map(|a| a.slice(offset, len)).collect();
            let args = match mask {
                // A FILTER narrows the rows first.
                Some(mask) => {
                    let mask = mask.slice(offset, len);
                    if mask.true_count() == 0 {
                        continue;
                    }
                    args.iter()
                        .map(|a| filter(a, &mask))
                        .collect::<std::result::Result<Vec<_>, _>>()?
                }
                None => args,
            };
            acc.update_batch(&args)?;
        }
        Ok(())
    }

    /// Merges partial states: each call's state columns.
    pub fn merge(&mut self, states: &[Vec<ArrayRef>]) -> Result<()> {
        for (acc, state) in self.accumulators.iter_mut().zip(states) {
            match acc {
                OneCall::Bigint(call) => call.merge(&state[0])?,
                OneCall::Row(acc) => acc.merge_batch(state)?,
            }
        }
        Ok(())
    }

    /// Each call's state columns, one row. The accumulators may be spent: go on with a
    /// new state that merges these.
    pub fn freeze(&mut self) -> Result<Vec<Vec<ArrayRef>>> {
        self.accumulators
            .iter_mut()
            .map(|a| match a {
                OneCall::Bigint(call) => Ok(vec![call.value().to_array()?]),
                OneCall::Row(a) => a
                    .state()?
                    .into_iter()
                    .map(|v| v.to_array())
                    .collect::<Result<Vec<_>>>(),
            })
            .collect()
    }

    /// Each call's state values, leaving the state as it was: DataFusion lets `state`
    /// consume an accumulator, so those of calls not known to survive it (`kept`) are
    /// built again from their values; SUM, COUNT, AVG, MIN and MAX need not be.
    pub fn state_values(
        &mut self,
        calls: &AggregateCalls,
        kept: &[bool],
    ) -> Result<Vec<Vec<ScalarValue>>> {
        let mut values = Vec::with_capacity(self.accumulators.len());
        for (i, acc) in self.accumulators.iter_mut().enumerate() {
            let acc = match acc {
                OneCall::Bigint(call) => {
                    values.push(vec![call.value()]);
                    continue;
                }
                OneCall::Row(acc) => acc,
            };
            let state = acc.state()?;
            if !kept[i] {
                let arrays = state
                    .iter()
                    .map(|v| v.to_array())
                    .collect::<Result<Vec<_>>>()?;
                *acc = calls.aggregates[i].create_accumulator()?;
                acc.merge_batch(&arrays)?;
            }
            values.push(state);
        }
        Ok(values)
    }

    /// Each call's final value; the accumulators may be spent.
    pub fn evaluate(&mut self) -> Result<Vec<ScalarValue>> {
        self.accumulators
            .iter_mut()
            .map(|a| match a {
                OneCall::Bigint(call) => Ok(call.value()),
                OneCall::Row(a) => a.evaluate(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::display::array_value_to_string;
    use datafusion::functions_aggregate as f;
    use datafusion::logical_expr::{AggregateUDF, Operator};
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{binary, cast, col, lit};

    use super::*;

    /// count, sum, avg, max, count DISTINCT and a FILTERed sum of v, grouped by k.
    fn calls() -> (AggregateCalls, SchemaRef) {
        let input: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, true),
        ]));
        let build = |udf: Arc<AggregateUDF>, name: &str, distinct: bool| {
            let mut b = AggregateExprBuilder::new(udf, vec![col("v", &input).unwrap()])
                .schema(input.clone())
                .alias(name);
            if distinct {
                b = b.distinct();
            }
            Arc::new(b.build().unwrap())
        };
        let above_two = binary(col("v", &input).unwrap(), Operator::Gt, lit(2i64), &input).unwrap();
        let calls = AggregateCalls {
            keys: vec![col("k", &input).unwrap()],
            key_schema: Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)])),
            aggregates: vec![
                build(f::count::count_udaf(), "n", false),
                build(f::sum::sum_udaf(), "total", false),
                // As planned: avg's argument is cast to a float first.
                Arc::new(
                    AggregateExprBuilder::new(
                        f::average::avg_udaf(),
                        vec![cast(col("v", &input).unwrap(), &input, DataType::Float64).unwrap()],
                    )
                    .schema(input.clone())
                    .alias("mean")
                    .build()
                    .unwrap(),
                ),
                build(f::min_max::max_udaf(), "top", false),
                build(f::count::count_udaf(), "distinct", true),
                build(f::sum::sum_udaf(), "above", false),
            ],
            filters: vec![None, None, None, None, None, Some(above_two)],
        };
        (calls, input)
    }

    fn rows(input: &SchemaRef, values: &[Option<i64>]) -> RecordBatch {
        RecordBatch::try_new(
            input.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1; values.len()])),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap()
    }

    fn grouped_values(state: &mut Grouped) -> Vec<String> {
        let (_, values) = state.evaluate().unwrap();
        values
            .iter()
            .map(|v| array_value_to_string(v, 0).unwrap())
            .collect()
    }

    fn one_values(state: &mut OneGroup) -> Vec<String> {
        state
            .evaluate()
            .unwrap()
            .iter()
            .map(|v| array_value_to_string(&v.to_array().unwrap(), 0).unwrap())
            .collect()
    }

    /// Reading a one-group state's values leaves it as it was, whether its calls' row
    /// accumulators survive `state()` (SUM, COUNT, AVG, MAX, MIN) or are built again
    /// (COUNT DISTINCT): read twice, they are the same, and rows folded in after count once.
    #[test]
    fn row_states_survive_being_read() {
        let (calls, input) = calls();
        let kept = calls.states_kept();
        assert_eq!(kept, [true, true, true, true, false, true]);
        let (first, second) = (
            rows(&input, &[Some(1), Some(2), Some(2)]),
            rows(&input, &[None, Some(5), Some(2)]),
        );
        let mut one = calls.new_one_group().unwrap();
        one.update_range(&calls.inputs(&first).unwrap(), 0, 3)
            .unwrap();
        let read = one.state_values(&calls, &kept).unwrap();
        assert_eq!(one.state_values(&calls, &kept).unwrap(), read);
        one.update_range(&calls.inputs(&second).unwrap(), 0, 3)
            .unwrap();
        assert_eq!(one_values(&mut one), ["5", "12", "2.4", "5", "3", "5"]);

        // MIN's state too (the calls above have MAX).
        let min =
            AggregateExprBuilder::new(f::min_max::min_udaf(), vec![col("v", &input).unwrap()])
                .schema(input.clone())
                .alias("least")
                .build()
                .unwrap();
        let calls = AggregateCalls {
            aggregates: vec![Arc::new(min)],
            filters: vec![None],
            ..calls
        };
        assert_eq!(calls.states_kept(), [true]);
        let mut one = calls.new_one_group().unwrap();
        one.update_range(&calls.inputs(&second).unwrap(), 0, 3)
            .unwrap();
        let read = one.state_values(&calls, &[true]).unwrap();
        assert_eq!(one.state_values(&calls, &[true]).unwrap(), read);
        one.update_range(&calls.inputs(&first).unwrap(), 0, 3)
            .unwrap();
        assert_eq!(one_values(&mut one), ["1"]);
    }

    /// One group's states and a Grouped's are the same columns: each merges the other's
    /// (sessions restore checkpoints taken when they were Grouped) with the values one
    /// state fed every row has.
    #[test]
    fn one_group_and_grouped_states_merge_each_other() {
        let (calls, input) = calls();
        let (first, second) = (
            rows(&input, &[Some(1), Some(2), Some(2)]),
            rows(&input, &[None, Some(5), Some(2)]),
        );
        let mut reference = calls.new_state().unwrap();
        for batch in [&first, &second] {
            let keys = calls.key_columns(batch).unwrap();
            reference.update(&calls, &keys, batch).unwrap();
        }
        let expected = grouped_values(&mut reference);
        assert_eq!(expected, ["5", "12", "2.4", "5", "3", "5"]);

        // Grouped, then one group.
        let mut grouped = calls.new_state().unwrap();
        grouped
            .update(&calls, &calls.key_columns(&first).unwrap(), &first)
            .unwrap();
        let mut one = calls.new_one_group().unwrap();
        one.merge(&grouped.freeze().unwrap().states).unwrap();
        one.update_range(&calls.inputs(&second).unwrap(), 0, second.num_rows())
            .unwrap();
        assert_eq!(one_values(&mut one), expected);

        // One group, then Grouped.
        let mut one = calls.new_one_group().unwrap();
        // Two calls over ranges of a batch's rows in session order, as sessions take theirs.
        let inputs = calls.inputs(&first).unwrap();
        let ordered = inputs.take(&UInt32Array::from(vec![2, 0, 1])).unwrap();
        one.update_range(&ordered, 0, 2).unwrap();
        one.update_range(&ordered, 2, 1).unwrap();
        let partial = Partial {
            keys: calls
                .key_columns(&first)
                .unwrap()
                .iter()
                .map(|k| k.slice(0, 1))
                .collect(),
            states: one.freeze().unwrap(),
        };
        let mut grouped = calls.new_state().unwrap();
        grouped.merge(&partial).unwrap();
        grouped
            .update(&calls, &calls.key_columns(&second).unwrap(), &second)
            .unwrap();
        assert_eq!(grouped_values(&mut grouped), expected);
    }
}
