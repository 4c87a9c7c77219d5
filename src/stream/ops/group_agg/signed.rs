//! count and sum over a retracting input, folded as two grouped accumulators each: one
//! over the rows added, one over the rows retracted; the result is their difference. A
//! change then costs what it touches, where recomputing from a key's argument rows would
//! cost every row the key holds.

use std::sync::Arc;

use datafusion::arrow::array::{
    new_empty_array, Array, ArrayRef, BooleanArray, Int64Array, UInt32Array,
};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::kernels::numeric::sub_wrapping;
use datafusion::arrow::compute::kernels::zip::zip;
use datafusion::arrow::compute::{and, is_not_null, not, nullif, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::{AggregateExprBuilder, AggregateFunctionExpr};

use crate::stream::ops::grouped::accumulator_of;

pub struct Signed {
    /// The accumulated calls: the aggregate over added rows, over retracted rows, and
    /// for sum a count of non-null values over each (the sum of no value is NULL).
    exprs: Vec<Arc<AggregateFunctionExpr>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Argument types, for resizing with empty input.
    argument_types: Vec<DataType>,
}

impl Signed {
    /// A signed form of `agg`, when it has one: count and sum of integers or decimals,
    /// without DISTINCT or ORDER BY.
    pub fn try_new(agg: &Arc<AggregateFunctionExpr>, input: &SchemaRef) -> Result<Option<Self>> {
        if agg.is_distinct() || !agg.order_bys().is_empty() {
            return Ok(None);
        }
        let argument_types = agg
            .expressions()
            .iter()
            .map(|e| e.data_type(input))
            .collect::<Result<Vec<_>>>()?;
        let exact = |t: &DataType| {
            matches!(
                t,
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Decimal128(..)
                    | DataType::Decimal256(..)
            )
        };
        let sum = match agg.fun().name() {
            "count" => false,
            "sum" if argument_types.iter().all(exact) => true,
            _ => return Ok(None),
        };
        let mut exprs = vec![agg.clone(), agg.clone()];
        if sum {
            let count = Arc::new(
                AggregateExprBuilder::new(
                    datafusion::functions_aggregate::count::count_udaf(),
                    agg.expressions(),
                )
                .schema(input.clone())
                .alias("count")
                .build()?,
            );
            exprs.push(count.clone());
            exprs.push(count);
        }
        let accumulators = exprs.iter().map(accumulator_of).collect::<Result<_>>()?;
        Ok(Some(Self {
            exprs,
            accumulators,
            argument_types,
        }))
    }

    /// Folds rows in: `retracts` marks the rows taken away.
    pub fn update(
        &mut self,
        args: &[ArrayRef],
        filter: Option<&BooleanArray>,
        retracts: &BooleanArray,
        indices: &[usize],
        total: usize,
    ) -> Result<()> {
        let added = not(retracts)?;
        let (added, retracted) = match filter {
            Some(f) => (and(f, &added)?, and(f, retracts)?),
            None => (added, retracts.clone()),
        };
        for (i, acc) in self.accumulators.iter_mut().enumerate() {
            let mask = if i % 2 == 0 { &added } else { &retracted };
            acc.update_batch(args, indices, Some(mask), total)?;
        }
        Ok(())
    }

    /// Sizes the accumulators for `total` groups (new groups hold no rows).
    pub fn resize(&mut self, total: usize) -> Result<()> {
        let empty: Vec<ArrayRef> = self.argument_types.iter().map(new_empty_array).collect();
        let none = BooleanArray::from(Vec::<bool>::new());
        for acc in &mut self.accumulators {
            acc.update_batch(&empty, &[], Some(&none), total)?;
        }
        Ok(())
    }

    /// The current values of `groups`, of `n` groups in all, without disturbing the state.
    pub fn evaluate(&mut self, groups: &[usize], n: usize) -> Result<ArrayRef> {
        let picked = UInt32Array::from_iter_values(groups.iter().map(|&g| g as u32));
        let mut values = Vec::with_capacity(self.accumulators.len());
        for (acc, expr) in self.accumulators.iter_mut().zip(&self.exprs) {
            let state = state_of(acc.as_mut(), n)?;
            let taken = state
                .iter()
                .map(|c| take(c.as_ref(), &picked, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let mut fresh = accumulator_of(expr)?;
            let local: Vec<usize> = (0..groups.len()).collect();
            fresh.merge_batch(&taken, &local, groups.len())?;
            values.push(zero_nulls(fresh.evaluate(EmitTo::All)?)?);
        }
        let result = sub_wrapping(&values[0], &values[1])?;
        if values.len() == 4 {
            let counted = sub_wrapping(&values[2], &values[3])?;
            let none = eq(&counted, &Int64Array::new_scalar(0))?;
            return Ok(nullif(&result, &none)?);
        }
        Ok(result)
    }

    /// Keeps the groups `keep` (ascending), renumbered from 0.
    pub fn compact(&mut self, keep: &UInt32Array, n: usize) -> Result<()> {
        let local: Vec<usize> = (0..keep.len()).collect();
        for acc in &mut self.accumulators {
            let state = acc.state(EmitTo::All)?;
            debug_assert!(state.iter().all(|c| c.len() == n));
            let kept = state
                .iter()
                .map(|c| take(c.as_ref(), keep, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            acc.merge_batch(&kept, &local, keep.len())?;
        }
        Ok(())
    }

    /// Every accumulator's partial state over `n` groups, for a snapshot.
    pub fn state(&mut self, n: usize) -> Result<Vec<ArrayRef>> {
        let mut columns = Vec::new();
        for acc in &mut self.accumulators {
            columns.extend(state_of(acc.as_mut(), n)?);
        }
        Ok(columns)
    }

    /// Merges stored partial states of `groups` (out of `total`); returns the columns read.
    pub fn restore(
        &mut self,
        columns: &[ArrayRef],
        groups: &[usize],
        total: usize,
    ) -> Result<usize> {
        let mut at = 0;
        for (acc, expr) in self.accumulators.iter_mut().zip(&self.exprs) {
            let width = expr.state_fields()?.len();
            acc.merge_batch(&columns[at..at + width], groups, total)?;
            at += width;
        }
        Ok(at)
    }

    pub fn size(&self) -> usize {
        self.accumulators.iter().map(|a| a.size()).sum()
    }
}

/// The partial state of every group, put back: grouped accumulators only give it away.
fn state_of(acc: &mut dyn GroupsAccumulator, n: usize) -> Result<Vec<ArrayRef>> {
    let state = acc.state(EmitTo::All)?;
    let all: Vec<usize> = (0..n).collect();
    acc.merge_batch(&state, &all, n)?;
    Ok(state)
}

/// NULL (a side without values) as zero.
fn zero_nulls(values: ArrayRef) -> Result<ArrayRef> {
    if values.null_count() == 0 {
        return Ok(values);
    }
    let zero = ScalarValue::new_zero(values.data_type())?.to_array_of_size(values.len())?;
    Ok(zip(&is_not_null(&values)?, &values, &zero)?)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::col;

    use super::*;

    fn call(name: &str, input: &SchemaRef) -> Arc<AggregateFunctionExpr> {
        let udf = match name {
            "sum" => datafusion::functions_aggregate::sum::sum_udaf(),
            "count" => datafusion::functions_aggregate::count::count_udaf(),
            _ => datafusion::functions_aggregate::min_max::max_udaf(),
        };
        Arc::new(
            AggregateExprBuilder::new(udf, vec![col("v", input).unwrap()])
                .schema(input.clone())
                .alias(name)
                .build()
                .unwrap(),
        )
    }

    #[test]
    fn sums_subtract_retractions_and_are_null_without_values() {
        let input: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        assert!(Signed::try_new(&call("max", &input), &input)
            .unwrap()
            .is_none());
        let mut sum = Signed::try_new(&call("sum", &input), &input)
            .unwrap()
            .unwrap();
        let mut count = Signed::try_new(&call("count", &input), &input)
            .unwrap()
            .unwrap();
        let add = |s: &mut Signed, v: Vec<Option<i64>>, retract: Vec<bool>, groups: Vec<usize>| {
            let args: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(v))];
            s.update(&args, None, &BooleanArray::from(retract), &groups, 2)
                .unwrap();
        };
        for s in [&mut sum, &mut count] {
            // Group 0: 5, NULL, 7 then 5 and 7 retracted; group 1: 3.
            add(
                s,
                vec![Some(5), None, Some(7), Some(3)],
                vec![false; 4],
                vec![0, 0, 0, 1],
            );
            add(s, vec![Some(5), Some(7)], vec![true, true], vec![0, 0]);
        }
        let sums = sum.evaluate(&[0, 1], 2).unwrap();
        let sums = sums.as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(sums.is_null(0), "only a NULL is left: the sum is NULL");
        assert_eq!(sums.value(1), 3);
        let counts = count.evaluate(&[1, 0], 2).unwrap();
        let counts = counts.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(counts.values().to_vec(), vec![1, 0]);
        // Evaluating leaves the state as it was.
        add(&mut sum, vec![Some(2)], vec![false], vec![0]);
        let sums = sum.evaluate(&[0], 2).unwrap();
        assert_eq!(
            sums.as_any().downcast_ref::<Int64Array>().unwrap().value(0),
            2
        );
    }
}
