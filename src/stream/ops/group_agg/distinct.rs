//! `count(DISTINCT x)` of an unbounded GROUP BY over inserts, with a set of values per
//! group, so that one group's count and state are read without touching the others.
//!
//! DataFusion's grouped accumulators evaluate and give their state only for every group
//! at once, and destructively: the aggregate then took all of them out and merged them
//! back at each barrier and checkpoint, which for distinct counts is every value seen
//! (Nexmark q16's profile: a quarter of the time, and checkpoints that grow with the
//! state). Here a barrier reads the changed groups' counts and a checkpoint the changed
//! groups' sets. The state has DataFusion's layout (a list of the group's values), so
//! checkpoints written by either restore into both.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, UInt32Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::kernels::boolean::{and, is_not_null};
use datafusion::arrow::compute::{cast, filter, prep_null_mask_filter, take};
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{DataFusionError, HashSet, Result};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

/// Each group's distinct values.
enum Sets {
    /// Integers of up to 32 bits unsigned or 64 bits signed, as i64.
    Ints(Vec<HashSet<i64>>),
    /// Anything else, as arrow row bytes.
    Rows {
        converter: RowConverter,
        sets: Vec<HashSet<Box<[u8]>>>,
    },
}

pub struct DistinctCount {
    /// The argument's type, which the state's lists hold.
    argument: DataType,
    /// The state's list item field (DataFusion's).
    item: FieldRef,
    sets: Sets,
}

impl DistinctCount {
    /// For `count(DISTINCT x)` of one argument; `None` for any other aggregate.
    pub fn of(
        agg: &AggregateFunctionExpr,
        input: &datafusion::arrow::datatypes::Schema,
    ) -> Result<Option<Self>> {
        let expressions = agg.expressions();
        let [argument] = expressions.as_slice() else {
            return Ok(None);
        };
        if !agg.is_distinct() || agg.fun().name() != "count" {
            return Ok(None);
        }
        let state = agg.state_fields()?;
        let [field] = state.as_slice() else {
            return Ok(None);
        };
        let DataType::List(item) = field.data_type() else {
            return Ok(None);
        };
        let argument = argument.data_type(input)?;
        if matches!(argument, DataType::Dictionary(..)) {
            // DataFusion's state holds the dictionary's values.
            return Ok(None);
        }
        let sets = match argument {
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32 => Sets::Ints(Vec::new()),
            // A type the row format cannot hold stays with DataFusion's accumulator.
            _ => match RowConverter::new(vec![SortField::new(argument.clone())]) {
                Ok(converter) => Sets::Rows {
                    converter,
                    sets: Vec::new(),
                },
                Err(_) => return Ok(None),
            },
        };
        Ok(Some(Self {
            argument,
            item: item.clone(),
            sets,
        }))
    }

    fn resize(&mut self, groups: usize) {
        match &mut self.sets {
            Sets::Ints(sets) => sets.resize_with(groups, HashSet::default),
            Sets::Rows { sets, .. } => sets.resize_with(groups, HashSet::default),
        }
    }

    fn len(&self) -> usize {
        match &self.sets {
            Sets::Ints(sets) => sets.len(),
            Sets::Rows { sets, .. } => sets.len(),
        }
    }

    /// Adds the non-null `values` of rows the filter lets through to their groups.
    fn insert(
        &mut self,
        values: &ArrayRef,
        groups: &[usize],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let kept = counted(values, filter)?;
        let kept = |i: usize| kept.value(i);
        match &mut self.sets {
            Sets::Ints(sets) => {
                let ints = cast(values, &DataType::Int64)?;
                let ints = ints.as_primitive::<Int64Type>();
                for (i, &g) in groups.iter().enumerate() {
                    if kept(i) {
                        sets[g].insert(ints.value(i));
                    }
                }
            }
            Sets::Rows { converter, sets } => {
                let rows = converter.convert_columns(std::slice::from_ref(values))?;
                for (i, &g) in groups.iter().enumerate() {
                    if kept(i) {
                        let row = rows.row(i);
                        if !sets[g].contains(row.as_ref()) {
                            sets[g].insert(row.as_ref().into());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The counts of `groups`, leaving every set as it is.
    pub fn counts_of(&self, groups: &[usize]) -> ArrayRef {
        let count = |g: usize| match &self.sets {
            Sets::Ints(sets) => sets[g].len() as i64,
            Sets::Rows { sets, .. } => sets[g].len() as i64,
        };
        Arc::new(Int64Array::from_iter_values(
            groups.iter().map(|&g| count(g)),
        ))
    }

    /// The state of `groups` (each one's values, as a list), leaving every set as it is.
    pub fn state_of(&self, groups: &[usize]) -> Result<Vec<ArrayRef>> {
        let mut offsets = Vec::with_capacity(groups.len() + 1);
        offsets.push(0i32);
        let values: ArrayRef = match &self.sets {
            Sets::Ints(sets) => {
                let ints = Int64Array::from_iter_values(groups.iter().flat_map(|&g| {
                    offsets.push(offsets.last().copied().unwrap_or(0) + sets[g].len() as i32);
                    sets[g].iter().copied()
                }));
                cast(&(Arc::new(ints) as ArrayRef), &self.argument)?
            }
            Sets::Rows { converter, sets } => {
                let parser = converter.parser();
                let mut rows = Vec::new();
                for &g in groups {
                    rows.extend(sets[g].iter().map(|bytes| parser.parse(bytes)));
                    offsets.push(rows.len() as i32);
                }
                converter
                    .convert_rows(rows)?
                    .pop()
                    .ok_or_else(|| DataFusionError::Internal("no distinct values column".into()))?
            }
        };
        self.lists(offsets, values)
    }

    /// The state: each group's values, `offsets` apart in `values`.
    fn lists(&self, offsets: Vec<i32>, values: ArrayRef) -> Result<Vec<ArrayRef>> {
        let offsets = OffsetBuffer::new(offsets.into());
        let list = ListArray::try_new(self.item.clone(), offsets, values, None)?;
        Ok(vec![Arc::new(list)])
    }

    /// The groups `emit_to` names.
    fn emitted(&self, emit_to: EmitTo) -> Vec<usize> {
        let n = match emit_to {
            EmitTo::All => self.len(),
            EmitTo::First(n) => n.min(self.len()),
        };
        (0..n).collect()
    }

    /// Forgets the first `n` groups (the others are renumbered from 0).
    fn drop_first(&mut self, n: usize) {
        match &mut self.sets {
            Sets::Ints(sets) => drop(sets.drain(..n)),
            Sets::Rows { sets, .. } => drop(sets.drain(..n)),
        }
    }
}

/// Which rows count: a non-null value that the FILTER (NULL meaning no) lets through.
fn counted(values: &ArrayRef, filter: Option<&BooleanArray>) -> Result<BooleanArray> {
    let present = is_not_null(values)?;
    Ok(match filter {
        Some(f) if f.null_count() > 0 => and(&present, &prep_null_mask_filter(f))?,
        Some(f) => and(&present, f)?,
        None => present,
    })
}

impl GroupsAccumulator for DistinctCount {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        self.insert(&values[0], group_indices, opt_filter)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let groups = self.emitted(emit_to);
        let counts = self.counts_of(&groups);
        self.drop_first(groups.len());
        Ok(counts)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let groups = self.emitted(emit_to);
        let state = self.state_of(&groups)?;
        self.drop_first(groups.len());
        Ok(state)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.resize(total_num_groups);
        // The values of every list, each with its row's group.
        let lists = values[0].as_list::<i32>();
        let offsets = lists.value_offsets();
        let (mut positions, mut groups) = (Vec::new(), Vec::new());
        for (row, &group) in group_indices.iter().enumerate() {
            if lists.is_null(row) {
                continue;
            }
            for at in offsets[row]..offsets[row + 1] {
                positions.push(at as u32);
                groups.push(group);
            }
        }
        let items = take(lists.values().as_ref(), &UInt32Array::from(positions), None)?;
        self.insert(&items, &groups, None)
    }

    /// Each row as the state of a group of its own: a list of its value, empty when the
    /// value is NULL or filtered out.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let values = &values[0];
        let kept = counted(values, opt_filter)?;
        let mut offsets = Vec::with_capacity(values.len() + 1);
        offsets.push(0i32);
        let mut n = 0;
        for present in kept.values() {
            n += present as i32;
            offsets.push(n);
        }
        let items = filter(values.as_ref(), &kept)?;
        self.lists(offsets, items)
    }

    fn size(&self) -> usize {
        let per_set = std::mem::size_of::<HashSet<i64>>();
        match &self.sets {
            Sets::Ints(sets) => sets.iter().map(|s| per_set + s.capacity() * 9).sum(),
            Sets::Rows { sets, .. } => sets
                .iter()
                .map(|s| per_set + s.capacity() * 17 + s.iter().map(|b| b.len()).sum::<usize>())
                .sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int32Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    fn count_distinct(ty: DataType) -> (AggregateFunctionExpr, Schema) {
        let schema = Schema::new(vec![Field::new("x", ty, true)]);
        let agg = AggregateExprBuilder::new(count_udaf(), vec![col("x", &schema).unwrap()])
            .schema(Arc::new(schema.clone()))
            .alias("c")
            .distinct()
            .build()
            .unwrap();
        (agg, schema)
    }

    fn counts(acc: &DistinctCount, groups: &[usize]) -> Vec<i64> {
        acc.counts_of(groups)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn counts_distinct_values_per_group_without_disturbing_them() {
        for (ty, values) in [
            (
                DataType::Int32,
                Arc::new(Int32Array::from(vec![
                    Some(1),
                    Some(1),
                    Some(2),
                    None,
                    Some(3),
                    Some(1),
                    Some(9),
                ])) as ArrayRef,
            ),
            (
                DataType::Utf8,
                Arc::new(StringArray::from(vec![
                    Some("a"),
                    Some("a"),
                    Some("b"),
                    None,
                    Some("c"),
                    Some("a"),
                    Some("z"),
                ])),
            ),
        ] {
            let (agg, schema) = count_distinct(ty);
            let mut acc = DistinctCount::of(&agg, &schema).unwrap().unwrap();
            // Group 0 gets 1, 1, 2 and NULL (and 9, whose FILTER is NULL: no); group 1
            // gets 3 (and 1, filtered out).
            let filter = BooleanArray::from(vec![
                Some(true),
                Some(true),
                Some(true),
                Some(true),
                Some(true),
                Some(false),
                None,
            ]);
            let groups = [0, 0, 0, 0, 1, 1, 0];
            acc.update_batch(std::slice::from_ref(&values), &groups, Some(&filter), 3)
                .unwrap();
            assert_eq!(counts(&acc, &[0, 1, 2]), [2, 1, 0]);
            // The same rows as per-row states, merged: the same counts.
            let rows = acc.convert_to_state(&[values], Some(&filter)).unwrap();
            let mut merged = DistinctCount::of(&agg, &schema).unwrap().unwrap();
            merged.merge_batch(&rows, &groups, 3).unwrap();
            assert_eq!(counts(&merged, &[0, 1, 2]), [2, 1, 0]);
            assert_eq!(
                counts(&acc, &[1, 0]),
                [1, 2],
                "reading twice gives the same"
            );
            // A group's state, merged elsewhere, counts the same; other groups are not in it.
            let state = acc.state_of(&[0]).unwrap();
            let mut copy = DistinctCount::of(&agg, &schema).unwrap().unwrap();
            copy.merge_batch(&state, &[1], 2).unwrap();
            assert_eq!(counts(&copy, &[0, 1]), [0, 2]);
            // Destructive reads, as GroupsAccumulator asks: the first group goes.
            assert_eq!(
                acc.evaluate(EmitTo::First(1))
                    .unwrap()
                    .as_primitive::<Int64Type>()
                    .values(),
                &[2]
            );
            assert_eq!(counts(&acc, &[0, 1]), [1, 0]);
        }
    }

    /// Checkpoints of either accumulator restore into the other.
    #[test]
    fn its_state_is_datafusions() {
        let (agg, schema) = count_distinct(DataType::Int64);
        let values: ArrayRef = Arc::new(Int64Array::from(vec![5, 6, 5, 7]));
        let mut theirs = agg.create_groups_accumulator().unwrap();
        theirs
            .update_batch(&[values], &[0, 0, 1, 1], None, 2)
            .unwrap();
        let mut ours = DistinctCount::of(&agg, &schema).unwrap().unwrap();
        ours.merge_batch(&theirs.state(EmitTo::All).unwrap(), &[0, 1], 2)
            .unwrap();
        assert_eq!(counts(&ours, &[0, 1]), [2, 2]);
        let mut theirs = agg.create_groups_accumulator().unwrap();
        theirs
            .merge_batch(&ours.state_of(&[0, 1]).unwrap(), &[0, 1], 2)
            .unwrap();
        assert_eq!(
            theirs
                .evaluate(EmitTo::All)
                .unwrap()
                .as_primitive::<Int64Type>()
                .values(),
            &[2, 2]
        );
        assert_eq!(ours.state_of(&[]).unwrap()[0].len(), 0);
    }
}
