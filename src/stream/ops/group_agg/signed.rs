//! count and sum over a retracting input, folded as two grouped accumulators each: one
//! over the rows added, one over the rows retracted; the result is their difference. A
//! change then costs what it touches, where recomputing from a key's argument rows would
//! cost every row the key holds.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array};
use datafusion::arrow::compute::kernels::cmp::eq;
use datafusion::arrow::compute::kernels::numeric::sub_wrapping;
use datafusion::arrow::compute::kernels::zip::zip;
use datafusion::arrow::compute::{and, is_not_null, not, nullif};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{Result, ScalarValue};
use datafusion::physical_expr::aggregate::{AggregateExprBuilder, AggregateFunctionExpr};

use super::states::GroupStates;

/// A signed aggregate's accumulated calls, kept among the operator's [`GroupStates`]
/// from `first` on: the aggregate over added rows, over retracted rows, and for sum a
/// count of non-null values over each (the sum of no value is NULL).
pub struct Signed {
    first: usize,
    sum: bool,
}

impl Signed {
    /// A signed form of `agg`, when it has one: count and sum of integers or decimals,
    /// without DISTINCT or ORDER BY. Its calls go to `exprs`, to be held in the
    /// [`GroupStates`] given to [`Signed::update`].
    pub fn try_new(
        agg: &Arc<AggregateFunctionExpr>,
        input: &SchemaRef,
        exprs: &mut Vec<Arc<AggregateFunctionExpr>>,
    ) -> Result<Option<Self>> {
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
        let first = exprs.len();
        exprs.push(agg.clone());
        exprs.push(agg.clone());
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
        Ok(Some(Self { first, sum }))
    }

    fn calls(&self) -> usize {
        if self.sum {
            4
        } else {
            2
        }
    }

    /// Folds rows of the groups staged in `states` in: `retracts` marks the rows taken
    /// away.
    pub fn update(
        &self,
        states: &mut GroupStates,
        args: &[ArrayRef],
        filter: Option<&BooleanArray>,
        retracts: &BooleanArray,
    ) -> Result<()> {
        let added = not(retracts)?;
        let (added, retracted) = match filter {
            Some(f) => (and(f, &added)?, and(f, retracts)?),
            None => (added, retracts.clone()),
        };
        for i in 0..self.calls() {
            let mask = if i % 2 == 0 { &added } else { &retracted };
            states.update(self.first + i, args, Some(mask))?;
        }
        Ok(())
    }

    /// The aggregate's values, from the values of every call in the [`GroupStates`].
    pub fn evaluate(&self, values: &[ArrayRef]) -> Result<ArrayRef> {
        let values = values[self.first..self.first + self.calls()]
            .iter()
            .map(|v| zero_nulls(v.clone()))
            .collect::<Result<Vec<_>>>()?;
        let result = sub_wrapping(&values[0], &values[1])?;
        if self.sum {
            let counted = sub_wrapping(&values[2], &values[3])?;
            let none = eq(&counted, &Int64Array::new_scalar(0))?;
            return Ok(nullif(&result, &none)?);
        }
        Ok(result)
    }
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

    use super::*;
    use crate::stream::ops::group_agg::states::tests::over_v;

    fn call(name: &str, input: &SchemaRef) -> Arc<AggregateFunctionExpr> {
        let udf = match name {
            "sum" => datafusion::functions_aggregate::sum::sum_udaf(),
            "count" => datafusion::functions_aggregate::count::count_udaf(),
            _ => datafusion::functions_aggregate::min_max::max_udaf(),
        };
        over_v(udf, name, input)
    }

    #[test]
    fn sums_subtract_retractions_and_are_null_without_values() {
        let input: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let mut exprs = Vec::new();
        assert!(Signed::try_new(&call("max", &input), &input, &mut exprs)
            .unwrap()
            .is_none());
        let sum = Signed::try_new(&call("sum", &input), &input, &mut exprs)
            .unwrap()
            .unwrap();
        let count = Signed::try_new(&call("count", &input), &input, &mut exprs)
            .unwrap()
            .unwrap();
        let mut states = GroupStates::try_new(exprs, &input).unwrap();
        states.resize(2);
        let add = |states: &mut GroupStates, v: Vec<Option<i64>>, retract: Vec<bool>, groups| {
            let args: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(v))];
            states.stage(groups);
            for s in [&sum, &count] {
                s.update(states, &args, None, &BooleanArray::from(retract.clone()))
                    .unwrap();
            }
        };
        // Group 0: 5, NULL, 7 then 5 and 7 retracted; group 1: 3.
        add(
            &mut states,
            vec![Some(5), None, Some(7), Some(3)],
            vec![false; 4],
            &[0, 0, 0, 1],
        );
        add(
            &mut states,
            vec![Some(5), Some(7)],
            vec![true, true],
            &[0, 0],
        );
        let sums = sum.evaluate(&states.evaluate(&[0, 1]).unwrap()).unwrap();
        let sums = sums.as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(sums.is_null(0), "only a NULL is left: the sum is NULL");
        assert_eq!(sums.value(1), 3);
        let counts = count.evaluate(&states.evaluate(&[1, 0]).unwrap()).unwrap();
        let counts = counts.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(counts.values().to_vec(), vec![1, 0]);
        // Evaluating leaves the state as it was.
        add(&mut states, vec![Some(2)], vec![false], &[0]);
        let sums = sum.evaluate(&states.evaluate(&[0]).unwrap()).unwrap();
        assert_eq!(
            sums.as_any().downcast_ref::<Int64Array>().unwrap().value(0),
            2
        );
    }
}
