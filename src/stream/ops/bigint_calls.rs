//! One group's COUNT, and SUM, MIN and MAX of BIGINT, kept as a plain number. A session
//! window folds in a row or two at a time, and DataFusion's row accumulators cost a
//! call through `dyn`, a slice of every argument and (for a snapshot) boxed values for
//! each; these take the same arguments and give the same states and results, so they
//! merge with DataFusion's grouped accumulators both ways.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BigintCall {
    Count(i64),
    Sum(Option<i64>),
    Min(Option<i64>),
    Max(Option<i64>),
}

impl BigintCall {
    /// A fresh state for `agg`, if it is one of these: one argument, not DISTINCT, no
    /// ORDER BY, and a BIGINT result (a SUM's state is its result's type, and its
    /// arguments are cast to it; a MIN's or MAX's is its argument's). Asked for every
    /// new session, so it reads no more than it must (no state fields: they format names).
    pub fn of(agg: &AggregateFunctionExpr) -> Option<Self> {
        let call = match agg.fun().name() {
            "count" => BigintCall::Count(0),
            "sum" => BigintCall::Sum(None),
            "min" => BigintCall::Min(None),
            "max" => BigintCall::Max(None),
            _ => return None,
        };
        let plain = !agg.is_distinct() && agg.order_bys().is_empty();
        (plain && agg.field().data_type() == &DataType::Int64 && agg.expressions().len() == 1)
            .then_some(call)
    }

    /// Folds in rows `offset..offset + len` of the argument, those `mask` keeps.
    pub fn update(
        &mut self,
        arg: &ArrayRef,
        mask: Option<&BooleanArray>,
        offset: usize,
        len: usize,
    ) -> Result<()> {
        let kept = |i: usize| arg.is_valid(i) && mask.is_none_or(|m| m.value(i));
        if let BigintCall::Count(n) = self {
            *n += (offset..offset + len).filter(|&i| kept(i)).count() as i64;
            return Ok(());
        }
        let values = arg.as_primitive_opt::<Int64Type>().ok_or_else(|| {
            DataFusionError::Internal(format!("BIGINT expected, not {}", arg.data_type()))
        })?;
        for i in (offset..offset + len).filter(|&i| kept(i)) {
            self.fold(values.value(i));
        }
        Ok(())
    }

    /// Folds in one value, as a row (SUM wraps on overflow, as DataFusion's does).
    fn fold(&mut self, v: i64) {
        match self {
            BigintCall::Count(n) => *n += v,
            BigintCall::Sum(s) => *s = Some(s.map_or(v, |s| s.wrapping_add(v))),
            BigintCall::Min(m) => *m = Some(m.map_or(v, |m| m.min(v))),
            BigintCall::Max(m) => *m = Some(m.map_or(v, |m| m.max(v))),
        }
    }

    /// Merges partial states (a COUNT's are counts, and add up).
    pub fn merge(&mut self, states: &ArrayRef) -> Result<()> {
        let values = states.as_primitive_opt::<Int64Type>().ok_or_else(|| {
            DataFusionError::Internal(format!("BIGINT state expected, not {}", states.data_type()))
        })?;
        for v in values.iter().flatten() {
            self.fold(v);
        }
        Ok(())
    }

    /// The state, as DataFusion's accumulators give it; also the result.
    pub fn value(&self) -> ScalarValue {
        ScalarValue::Int64(match *self {
            BigintCall::Count(n) => Some(n),
            BigintCall::Sum(v) | BigintCall::Min(v) | BigintCall::Max(v) => v,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
    use datafusion::functions_aggregate as f;
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::{cast, col};

    use super::*;

    fn call(udf: Arc<AggregateUDF>, input: &SchemaRef, column: &str) -> AggregateFunctionExpr {
        AggregateExprBuilder::new(udf, vec![col(column, input).unwrap()])
            .schema(input.clone())
            .alias("a")
            .build()
            .unwrap()
    }

    #[test]
    fn states_and_results_are_datafusions() {
        let input: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("small", DataType::Int32, true),
        ]));
        let values: ArrayRef = Arc::new(Int64Array::from(vec![
            Some(5),
            None,
            Some(-3),
            Some(i64::MAX),
            Some(2),
            None,
        ]));
        let mask = BooleanArray::from(vec![true, true, false, true, true, true]);
        let earlier: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), None, Some(-9)]));
        for udf in [
            f::count::count_udaf(),
            f::sum::sum_udaf(),
            f::min_max::min_udaf(),
            f::min_max::max_udaf(),
        ] {
            let agg = call(udf, &input, "v");
            let mut ours = BigintCall::of(&agg).expect("a BIGINT call");
            let mut theirs = agg.create_accumulator().unwrap();
            // Rows in two ranges, the mask's rows only, then partial states (SUM wraps).
            ours.update(&values, Some(&mask), 0, 2).unwrap();
            ours.update(&values, Some(&mask), 2, 4).unwrap();
            let kept = datafusion::arrow::compute::filter(&values, &mask).unwrap();
            theirs.update_batch(&[kept.slice(0, 2)]).unwrap();
            theirs
                .update_batch(&[kept.slice(2, kept.len() - 2)])
                .unwrap();
            assert_eq!(
                vec![ours.value()],
                theirs.state().unwrap(),
                "{}",
                agg.name()
            );
            ours.merge(&earlier).unwrap();
            theirs.merge_batch(std::slice::from_ref(&earlier)).unwrap();
            assert_eq!(
                ours.value(),
                theirs.evaluate().unwrap(),
                "{}",
                agg.fun().name()
            );
        }
        // Nothing folded in: what DataFusion gives for no rows.
        let agg = call(f::sum::sum_udaf(), &input, "v");
        let empty = BigintCall::of(&agg).unwrap();
        assert_eq!(
            empty.value(),
            agg.create_accumulator().unwrap().evaluate().unwrap()
        );
        // Others stay DataFusion's: DISTINCT, and a MIN over INT.
        let distinct =
            AggregateExprBuilder::new(f::count::count_udaf(), vec![col("v", &input).unwrap()])
                .schema(input.clone())
                .alias("d")
                .distinct()
                .build()
                .unwrap();
        assert_eq!(BigintCall::of(&distinct), None);
        assert_eq!(
            BigintCall::of(&call(f::min_max::min_udaf(), &input, "small")),
            None
        );
        // A SUM over INT sums its argument cast to BIGINT, as planned.
        let sum_small = AggregateExprBuilder::new(
            f::sum::sum_udaf(),
            vec![cast(col("small", &input).unwrap(), &input, DataType::Int64).unwrap()],
        )
        .schema(input.clone())
        .alias("s")
        .build()
        .unwrap();
        assert_eq!(BigintCall::of(&sum_small), Some(BigintCall::Sum(None)));
    }
}
