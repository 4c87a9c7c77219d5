//! Unbounded GROUP BY: one result row per key, corrected with -U/+U as rows arrive.
//!
//! Changes are folded for a whole epoch and each changed key is emitted once at the
//! barrier (Flink's mini-batch aggregation): old result -U, new result +U, a new key +I,
//! a key whose rows were all retracted -D. A key whose result did not change emits
//! nothing.
//!
//! Two ways to hold a key's aggregate, chosen by the input's changelog:
//! - insert-only input: DataFusion GroupsAccumulators fold rows in as they come, over the
//!   keys changed in the epoch only; at the barrier their partial states are merged into
//!   each key's settled one (see `states`) and evaluated, so every aggregate DataFusion
//!   has works, with no retraction support.
//! - retracting input: count and sum fold added and retracted rows into two accumulators
//!   each and subtract (see `signed`); every other aggregate (min, max, count DISTINCT,
//!   string_agg ...) keeps the multiset of its argument rows per key and a changed key is
//!   recomputed from it, at a cost that grows with the key's distinct rows.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int8Array, RecordBatch, UInt32Array,
};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use datafusion::common::Result;
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_plan::aggregates::group_values::{new_group_values, GroupValues};
use datafusion::physical_plan::aggregates::order::GroupOrdering;

use super::grouped::AggregateCalls;
use signed::Signed;

mod checkpoint;
mod distinct;
mod signed;
mod spill;
mod states;
use crate::stream::message::{ChangeBatch, Op};
use crate::stream::operator::{Operator, StateReader};
use crate::stream::snapshot;
use crate::stream::state_backend::SledBackend;
use distinct::DistinctCount;
use states::GroupStates;

/// How a key's aggregate state is held (see the module comment).
enum Values {
    Accumulators(Vec<Aggregate>),
    Multisets {
        /// A constant, then the argument columns of every aggregate without a signed
        /// form, with a boolean per FILTER.
        converter: RowConverter,
        /// Per group: argument row -> how many times it is present.
        rows: Vec<HashMap<OwnedRow, i64>>,
        /// Bytes of the rows held, as [`row_bytes`] counts them.
        rows_bytes: usize,
        /// Per aggregate: its signed form (count, sum), which needs no argument rows.
        signed: Vec<Option<Signed>>,
    },
}

/// One aggregate's state over inserts: DataFusion's grouped accumulator states, kept in
/// the operator's [`GroupStates`] at an index, or, for a distinct count, sets that are read
/// group by group (see `distinct`).
enum Aggregate {
    Groups(usize),
    DistinctCount(DistinctCount),
}

impl Aggregate {
    /// Aggregate `i` of `calls`; one held in [`GroupStates`] joins `exprs`.
    fn new(
        calls: &AggregateCalls,
        i: usize,
        input: &SchemaRef,
        exprs: &mut Vec<Arc<AggregateFunctionExpr>>,
    ) -> Result<Self> {
        let agg = &calls.aggregates[i];
        Ok(match DistinctCount::of(agg, input)? {
            Some(distinct) => Aggregate::DistinctCount(distinct),
            None => {
                exprs.push(agg.clone());
                Aggregate::Groups(exprs.len() - 1)
            }
        })
    }

    fn size(&self) -> usize {
        match self {
            Aggregate::Groups(_) => 0,
            Aggregate::DistinctCount(distinct) => distinct.size(),
        }
    }
}

pub struct GroupAggregate {
    calls: Arc<AggregateCalls>,
    /// Input schema, for empty argument columns of a global aggregate with no rows.
    input: SchemaRef,
    schema: SchemaRef,
    /// Whether there are GROUP BY keys in the output (a global aggregate has none).
    keyed: bool,
    ttl: Option<Duration>,
    groups: Box<dyn GroupValues>,
    indices: Vec<usize>,
    key_converter: RowConverter,
    /// Key of each group, by group index.
    keys: Rows,
    values: Values,
    /// The partial states of the aggregates DataFusion's accumulators compute (over
    /// inserts), or of the signed aggregates' calls (over a retracting input).
    states: GroupStates,
    /// Rows currently counted per group (retracting input), to know when a key is gone.
    counts: Vec<i64>,
    /// The aggregate values last emitted per group (row bytes of `value_converter`;
    /// empty when there are no aggregates, as for DISTINCT).
    emitted: Vec<Option<Box<[u8]>>>,
    /// Bytes of the emitted values (kept up to date: summing them walked every group at
    /// every checkpoint).
    emitted_bytes: usize,
    value_converter: RowConverter,
    touched: Vec<Instant>,
    /// Under the sled backend: created since the previous move out (not brought back
    /// from disk), so unproven: such groups go out first.
    created_since_shed: Vec<bool>,
    changed: Vec<bool>,
    changed_list: Vec<usize>,
    /// Groups changed since the last snapshot, for incremental checkpoints.
    dirty: Vec<bool>,
    dirty_list: Vec<usize>,
    /// Keys the TTL removed since the last snapshot.
    removed: Vec<Box<[u8]>>,
    /// A global aggregate emits its row for empty input once, at the first barrier.
    started: bool,
    /// Under the sled state backend: where groups beyond the memory budget go.
    spill: Option<spill::Spill>,
    /// Restored batches held until the last one came (layers replace keys, and
    /// accumulators only merge).
    restoring: Vec<RecordBatch>,
}

impl GroupAggregate {
    /// `retracting`: whether the input carries retractions (chooses how values are held).
    pub fn try_new(
        calls: Arc<AggregateCalls>,
        input: SchemaRef,
        schema: SchemaRef,
        keyed: bool,
        retracting: bool,
        ttl: Option<Duration>,
    ) -> Result<Self> {
        let key_converter = crate::stream::row_converter(calls.key_schema.fields())?;
        let mut exprs = Vec::new();
        let values = if retracting {
            let signed = calls
                .aggregates
                .iter()
                .map(|agg| Signed::try_new(agg, &input, &mut exprs))
                .collect::<Result<Vec<_>>>()?;
            // A leading constant column: a row exists even for aggregates without
            // arguments.
            let mut fields = vec![SortField::new(DataType::Boolean)];
            for (i, agg) in calls.aggregates.iter().enumerate() {
                if signed[i].is_some() {
                    continue;
                }
                for e in agg.expressions() {
                    fields.push(SortField::new(e.data_type(&input)?));
                }
                if calls.filters[i].is_some() {
                    fields.push(SortField::new(DataType::Boolean));
                }
            }
            Values::Multisets {
                converter: RowConverter::new(fields)?,
                rows: Vec::new(),
                rows_bytes: 0,
                signed,
            }
        } else {
            Values::Accumulators(
                (0..calls.aggregates.len())
                    .map(|i| Aggregate::new(&calls, i, &input, &mut exprs))
                    .collect::<Result<_>>()?,
            )
        };
        let n_keys = calls.key_schema.fields().len();
        let output_keys = if keyed { n_keys } else { 0 };
        let value_converter = crate::stream::row_converter(&schema.fields()[output_keys..])?;
        let states = GroupStates::try_new(exprs, &input)?;
        Ok(Self {
            groups: new_group_values(calls.key_schema.clone(), &GroupOrdering::None)?,
            keys: key_converter.empty_rows(0, 0),
            key_converter,
            calls,
            input,
            schema,
            keyed,
            ttl,
            indices: Vec::new(),
            values,
            states,
            counts: Vec::new(),
            emitted: Vec::new(),
            emitted_bytes: 0,
            value_converter,
            touched: Vec::new(),
            created_since_shed: Vec::new(),
            changed: Vec::new(),
            changed_list: Vec::new(),
            dirty: Vec::new(),
            dirty_list: Vec::new(),
            removed: Vec::new(),
            started: false,
            spill: None,
            restoring: Vec::new(),
        })
    }

    /// Keeps groups beyond `backend`'s memory budget on disk, if
    /// [`GroupAggregate::can_spill`].
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        if let Some(backend) = backend {
            self.open_spill(backend)?;
        }
        Ok(self)
    }

    /// Whether the sled backend can keep its groups (see [`GroupAggregate::spill_rows`]).
    pub fn can_spill(&mut self) -> Result<bool> {
        Ok(self.spill_rows()?.is_some())
    }

    fn mark(&mut self, group: usize, now: Instant) {
        self.touched[group] = now;
        self.mark_dirty(group);
        if !self.changed[group] {
            self.changed[group] = true;
            self.changed_list.push(group);
        }
    }

    /// Changed since the previous snapshot.
    fn mark_dirty(&mut self, group: usize) {
        if !self.dirty[group] {
            self.dirty[group] = true;
            self.dirty_list.push(group);
        }
    }

    /// Group keys from their row-encoded bytes.
    fn decode_keys(&self, encoded: &ArrayRef) -> Result<Vec<ArrayRef>> {
        let keys = snapshot::downcast::<BinaryArray>(encoded)?;
        let parser = self.key_converter.parser();
        Ok(self
            .key_converter
            .convert_rows((0..keys.len()).map(|i| parser.parse(keys.value(i))))?)
    }

    /// Room for `more` groups in the per-group vectors at once (a restore adds millions:
    /// growing them by doubling copied every one of them again and again).
    fn reserve_groups(&mut self, more: usize, key_bytes: usize) {
        if self.keys.num_rows() == 0 {
            self.keys = self.key_converter.empty_rows(more, key_bytes);
        }
        self.counts.reserve_exact(more);
        self.emitted.reserve_exact(more);
        self.touched.reserve_exact(more);
        self.created_since_shed.reserve_exact(more);
        self.changed.reserve_exact(more);
        self.dirty.reserve_exact(more);
        self.states.reserve(more);
        if let Values::Multisets { rows, .. } = &mut self.values {
            rows.reserve_exact(more);
        }
    }

    /// Interns `keys` (key columns), registering new groups.
    fn intern(&mut self, keys: &[ArrayRef]) -> Result<()> {
        let before = self.groups.len();
        self.groups.intern(keys, &mut self.indices)?;
        let after = self.groups.len();
        if after > before {
            let rows = self.key_converter.convert_columns(keys)?;
            let mut next = before;
            for (i, &g) in self.indices.iter().enumerate() {
                if g == next {
                    self.keys.push(rows.row(i));
                    next += 1;
                }
            }
            self.counts.resize(after, 0);
            self.emitted.resize(after, None);
            self.touched.resize(after, Instant::now());
            self.created_since_shed.resize(after, true);
            self.changed.resize(after, false);
            self.dirty.resize(after, false);
            self.states.resize(after);
            if let Values::Multisets { rows, .. } = &mut self.values {
                rows.resize_with(after, HashMap::new);
            }
        }
        Ok(())
    }

    /// A constant, then the argument columns of every aggregate kept as rows (and FILTER
    /// masks).
    fn argument_columns(&self, batch: &RecordBatch, signed: &[bool]) -> Result<Vec<ArrayRef>> {
        let mut columns: Vec<ArrayRef> =
            vec![Arc::new(BooleanArray::from(vec![true; batch.num_rows()]))];
        for (i, _) in signed.iter().enumerate().filter(|(_, signed)| !**signed) {
            columns.extend(self.calls.arguments(i, batch)?);
            if let Some(mask) = self.calls.filter(i, batch)? {
                columns.push(Arc::new(mask));
            }
        }
        Ok(columns)
    }

    /// Current aggregate values of `groups`, one row each, evaluated without disturbing
    /// the state.
    fn evaluate(&mut self, groups: &[usize]) -> Result<Vec<ArrayRef>> {
        if self.calls.aggregates.is_empty() {
            return Ok(vec![]);
        }
        let k = groups.len();
        let held = self.states.evaluate(groups)?;
        let (converter, rows, signed) = match &mut self.values {
            Values::Accumulators(aggregates) => {
                return Ok(aggregates
                    .iter()
                    .map(|aggregate| match aggregate {
                        Aggregate::Groups(j) => held[*j].clone(),
                        Aggregate::DistinctCount(distinct) => distinct.counts_of(groups),
                    })
                    .collect());
            }
            Values::Multisets {
                converter,
                rows,
                signed,
                ..
            } => (converter, rows, signed),
        };
        // Aggregates without a signed form: recomputed from the groups' argument rows.
        let mut fresh = self.calls.new_accumulators()?;
        let mut local = Vec::new();
        let mut picked = converter.empty_rows(0, 0);
        for (l, &g) in groups.iter().enumerate() {
            for (row, &count) in &rows[g] {
                for _ in 0..count.max(0) {
                    picked.push(row.row());
                    local.push(l);
                }
            }
        }
        let columns = converter.convert_rows(picked.iter())?;
        let mut at = 1;
        for (i, acc) in fresh.iter_mut().enumerate() {
            if signed[i].is_some() {
                continue;
            }
            let n = self.calls.aggregates[i].expressions().len();
            let args = &columns[at..at + n];
            at += n;
            let filter = if self.calls.filters[i].is_some() {
                at += 1;
                Some(
                    columns[at - 1]
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .expect("filter columns are boolean")
                        .clone(),
                )
            } else {
                None
            };
            acc.update_batch(args, &local, filter.as_ref(), k)?;
        }
        // Groups without rows still get a value (count 0, sum NULL).
        size_groups(
            &self.calls,
            &self.input,
            fresh.iter_mut().map(|a| a.as_mut()).enumerate(),
            k,
        )?;
        fresh
            .iter_mut()
            .zip(signed.iter())
            .map(|(acc, signed)| match signed {
                Some(signed) => signed.evaluate(&held),
                None => acc.evaluate(EmitTo::All),
            })
            .collect()
    }

    /// Emits the changed groups' new results against what was emitted before.
    fn emit(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if !self.keyed && !self.started {
            self.started = true;
            if self.groups.is_empty() {
                // A global aggregate's single group, holding no rows yet.
                let unit: Vec<ArrayRef> = vec![Arc::new(BooleanArray::from(vec![true]))];
                self.intern(&unit)?;
                // Distinct counts need their group; other states start empty.
                if let Values::Accumulators(aggregates) = &mut self.values {
                    size_groups(&self.calls, &self.input, distinct_counts(aggregates), 1)?;
                }
                self.mark(0, Instant::now());
            }
        }
        self.expire()?;
        if self.changed_list.is_empty() {
            return Ok(());
        }
        let mut changed = std::mem::take(&mut self.changed_list);
        changed.sort_unstable();
        for &g in &changed {
            self.changed[g] = false;
        }
        let retracting = matches!(self.values, Values::Multisets { .. });
        // Keys whose rows were all retracted leave (a global aggregate keeps its row).
        let (live, gone): (Vec<usize>, Vec<usize>) = changed
            .iter()
            .partition(|&&g| !retracting || self.counts[g] > 0 || !self.keyed);
        let values = self.evaluate(&live)?;
        let new_rows = if values.is_empty() {
            None
        } else {
            Some(self.value_converter.convert_columns(&values)?)
        };
        let new_bytes = |l: usize| -> Box<[u8]> {
            new_rows
                .as_ref()
                .map_or_else(|| Box::from([]), |r| Box::from(r.row(l).as_ref()))
        };
        let mut old: Vec<(usize, Op)> = Vec::new();
        let mut new: Vec<(usize, Op)> = Vec::new();
        for (l, &g) in live.iter().enumerate() {
            match &self.emitted[g] {
                Some(prev) if **prev == *new_bytes(l) => {}
                Some(_) => {
                    old.push((g, Op::UpdateBefore));
                    new.push((l, Op::UpdateAfter));
                }
                None => new.push((l, Op::Insert)),
            }
        }
        for &g in &gone {
            if self.emitted[g].is_some() {
                old.push((g, Op::Delete));
            }
        }
        let mut batches = Vec::new();
        if !old.is_empty() {
            let keys = self
                .key_converter
                .convert_rows(old.iter().map(|(g, _)| self.keys.row(*g)))?;
            let values = if values.is_empty() {
                vec![]
            } else {
                let parser = self.value_converter.parser();
                self.value_converter
                    .convert_rows(old.iter().map(|(g, _)| {
                        parser.parse(self.emitted[*g].as_deref().expect("emitted"))
                    }))?
            };
            batches.push((self.output(keys, values, old.len())?, ops(&old)));
        }
        if !new.is_empty() {
            let keys = self
                .key_converter
                .convert_rows(new.iter().map(|(l, _)| self.keys.row(live[*l])))?;
            let picked = UInt32Array::from_iter_values(new.iter().map(|(l, _)| *l as u32));
            let values = values
                .iter()
                .map(|c| take(c.as_ref(), &picked, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            batches.push((self.output(keys, values, new.len())?, ops(&new)));
        }
        for (l, &g) in live.iter().enumerate() {
            self.set_emitted(g, Some(new_bytes(l)));
        }
        for &g in &gone {
            self.set_emitted(g, None);
        }
        for (rows, ops) in batches {
            out.push(ChangeBatch {
                rows,
                watermarks: None,
                ops: Some(ops),
            });
        }
        if !gone.is_empty() {
            let gone_set: std::collections::HashSet<usize> = gone.into_iter().collect();
            let keep: Vec<usize> = (0..self.groups.len())
                .filter(|g| !gone_set.contains(g))
                .collect();
            self.compact(&keep)?;
        }
        Ok(())
    }

    fn output(
        &self,
        keys: Vec<ArrayRef>,
        values: Vec<ArrayRef>,
        rows: usize,
    ) -> Result<RecordBatch> {
        let mut columns = if self.keyed { keys } else { vec![] };
        columns.extend(values);
        crate::stream::batch_of(self.schema.clone(), columns, rows)
    }

    /// Forgets groups untouched for longer than the TTL, silently (Flink's state TTL).
    fn expire(&mut self) -> Result<()> {
        // A global aggregate has a single key: nothing to bound.
        let Some(ttl) = self.ttl.filter(|_| self.keyed) else {
            return Ok(());
        };
        let now = Instant::now();
        let keep: Vec<usize> = (0..self.groups.len())
            .filter(|&g| self.changed[g] || now.duration_since(self.touched[g]) < ttl)
            .collect();
        if keep.len() < self.groups.len() {
            self.compact(&keep)?;
        }
        Ok(())
    }

    /// Keeps only the groups `keep` (ascending), renumbering them 0.. in that order.
    fn compact(&mut self, keep: &[usize]) -> Result<()> {
        let picked = UInt32Array::from_iter_values(keep.iter().map(|&g| g as u32));
        let k = keep.len();
        let local: Vec<usize> = (0..k).collect();
        let n = self.groups.len();
        let key_columns = self.groups.emit(EmitTo::All)?;
        let key_columns = key_columns
            .iter()
            .map(|c| take(c.as_ref(), &picked, None))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        self.groups = new_group_values(self.calls.key_schema.clone(), &GroupOrdering::None)?;
        self.groups.intern(&key_columns, &mut self.indices)?;
        debug_assert_eq!(self.indices, local);
        self.states.compact(keep)?;
        match &mut self.values {
            Values::Accumulators(aggregates) => {
                for (_, acc) in distinct_counts(aggregates) {
                    let state = acc.state(EmitTo::All)?;
                    let state = state
                        .iter()
                        .map(|c| take(c.as_ref(), &picked, None))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    acc.merge_batch(&state, &local, k)?;
                }
            }
            Values::Multisets {
                rows, rows_bytes, ..
            } => {
                let mut old = std::mem::take(rows);
                *rows = keep.iter().map(|&g| std::mem::take(&mut old[g])).collect();
                *rows_bytes = rows.iter().flat_map(|set| set.keys()).map(row_bytes).sum();
            }
        }
        let mut keys = self.key_converter.empty_rows(k, 0);
        for &g in keep {
            keys.push(self.keys.row(g));
        }
        let old_keys = std::mem::replace(&mut self.keys, keys);
        self.counts = keep.iter().map(|&g| self.counts[g]).collect();
        self.emitted = keep.iter().map(|&g| self.emitted[g].take()).collect();
        self.emitted_bytes = self.emitted.iter().flatten().map(|e| e.len()).sum();
        self.touched = keep.iter().map(|&g| self.touched[g]).collect();
        self.created_since_shed = keep.iter().map(|&g| self.created_since_shed[g]).collect();
        let changed: Vec<bool> = keep.iter().map(|&g| self.changed[g]).collect();
        self.changed = changed;
        self.changed_list = (0..k).filter(|&g| self.changed[g]).collect();
        let mut kept = vec![false; n];
        for &g in keep {
            kept[g] = true;
        }
        self.removed.extend(
            (0..n)
                .filter(|&g| !kept[g])
                .map(|g| Box::from(old_keys.row(g).as_ref())),
        );
        let dirty: Vec<bool> = keep.iter().map(|&g| self.dirty[g]).collect();
        self.dirty = dirty;
        self.dirty_list = (0..k).filter(|&g| self.dirty[g]).collect();
        Ok(())
    }
}

/// Sizes `accumulators` (each with the index of its aggregate call) for `groups`
/// groups, those without rows included.
fn size_groups<'a>(
    calls: &AggregateCalls,
    input: &SchemaRef,
    accumulators: impl Iterator<Item = (usize, &'a mut dyn GroupsAccumulator)>,
    groups: usize,
) -> Result<()> {
    for (i, acc) in accumulators {
        let arguments = calls.aggregates[i]
            .expressions()
            .iter()
            .map(|e| e.data_type(input))
            .collect::<Result<Vec<_>>>()?;
        states::size(acc, &arguments, groups)?;
    }
    Ok(())
}

/// The distinct counts among `aggregates`, with their indices.
fn distinct_counts(
    aggregates: &mut [Aggregate],
) -> impl Iterator<Item = (usize, &mut dyn GroupsAccumulator)> {
    aggregates
        .iter_mut()
        .enumerate()
        .filter_map(|(i, aggregate)| match aggregate {
            Aggregate::DistinctCount(distinct) => Some((i, distinct as &mut dyn GroupsAccumulator)),
            Aggregate::Groups(_) => None,
        })
}

/// What an argument row held costs in memory (its bytes and the hash map's entry).
fn row_bytes(row: &OwnedRow) -> usize {
    row.as_ref().len() + 48
}

fn ops(rows: &[(usize, Op)]) -> Int8Array {
    Int8Array::from_iter_values(rows.iter().map(|(_, op)| *op as i8))
}

impl GroupAggregate {
    /// Folds a batch into its groups' accumulators or multisets.
    fn aggregate(&mut self, batch: &ChangeBatch) -> Result<()> {
        let keys = self.calls.key_columns(&batch.rows)?;
        self.bring_back(&keys)?;
        self.intern(&keys)?;
        let now = Instant::now();
        let total = self.groups.len();
        self.states.stage(&self.indices);
        match &mut self.values {
            Values::Accumulators(aggregates) => {
                for (i, aggregate) in aggregates.iter_mut().enumerate() {
                    let args = self.calls.arguments(i, &batch.rows)?;
                    let filter = self.calls.filter(i, &batch.rows)?;
                    match aggregate {
                        Aggregate::Groups(j) => self.states.update(*j, &args, filter.as_ref())?,
                        Aggregate::DistinctCount(distinct) => {
                            distinct.update_batch(&args, &self.indices, filter.as_ref(), total)?
                        }
                    }
                }
                for i in 0..self.indices.len() {
                    let g = self.indices[i];
                    self.counts[g] += 1;
                    self.mark(g, now);
                }
            }
            Values::Multisets { signed, .. } => {
                let is_signed: Vec<bool> = signed.iter().map(Option::is_some).collect();
                if is_signed.iter().any(|s| *s) {
                    let retracts = BooleanArray::from_iter(
                        (0..batch.num_rows()).map(|i| Some(batch.retracts(i))),
                    );
                    for i in 0..is_signed.len() {
                        if !is_signed[i] {
                            continue;
                        }
                        let args = self.calls.arguments(i, &batch.rows)?;
                        let filter = self.calls.filter(i, &batch.rows)?;
                        let Values::Multisets { signed, .. } = &self.values else {
                            unreachable!()
                        };
                        signed[i].as_ref().expect("signed").update(
                            &mut self.states,
                            &args,
                            filter.as_ref(),
                            &retracts,
                        )?;
                    }
                }
                let columns = self.argument_columns(&batch.rows, &is_signed)?;
                let Values::Multisets {
                    converter,
                    rows,
                    rows_bytes,
                    ..
                } = &mut self.values
                else {
                    unreachable!()
                };
                // Nothing to keep as rows (DISTINCT, or signed aggregates only): the row
                // counts say it all.
                let encoded = if is_signed.iter().all(|s| *s) {
                    None
                } else {
                    Some(converter.convert_columns(&columns)?)
                };
                for i in 0..batch.num_rows() {
                    let g = self.indices[i];
                    let sign = if batch.retracts(i) { -1 } else { 1 };
                    if let Some(encoded) = &encoded {
                        match rows[g].entry(encoded.row(i).owned()) {
                            Entry::Occupied(mut held) => {
                                *held.get_mut() += sign;
                                if *held.get() == 0 {
                                    *rows_bytes -= row_bytes(held.key());
                                    held.remove();
                                }
                            }
                            Entry::Vacant(new) => {
                                *rows_bytes += row_bytes(new.key());
                                new.insert(sign);
                            }
                        }
                    }
                }
                for i in 0..batch.num_rows() {
                    let g = self.indices[i];
                    self.counts[g] += if batch.retracts(i) { -1 } else { 1 };
                    self.mark(g, now);
                }
            }
        }
        Ok(())
    }
}

impl Operator for GroupAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.aggregate(&batch)?;
        if self.over_budget(batch.num_rows()) {
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

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.whole_snapshot()
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        self.changed_snapshot().map(Some)
    }

    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        self.spilled_snapshot(whole)
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        if self.spill.is_some() {
            for batch in &state {
                self.restore_to_disk(batch)?;
            }
        } else {
            self.restoring.extend(state);
        }
        Ok(())
    }

    fn restored(&mut self) -> Result<()> {
        let state = std::mem::take(&mut self.restoring);
        if state.is_empty() {
            return Ok(());
        }
        self.restore_layers(state)
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let (_, _, columns) = snapshot::parts(batch, 0)?;
        let at = if snapshot::kind(batch)? == "groups" {
            1
        } else {
            0
        };
        self.decode_keys(&columns[at]).map(Some)
    }

    fn state_size(&self) -> usize {
        self.memory_size() + self.spill.as_ref().map_or(0, spill::Spill::bytes)
    }
}

impl GroupAggregate {
    /// Bytes of the groups in memory.
    fn memory_size(&self) -> usize {
        let values = match &self.values {
            Values::Accumulators(aggregates) => {
                aggregates.iter().map(Aggregate::size).sum::<usize>()
            }
            Values::Multisets { rows_bytes, .. } => *rows_bytes,
        };
        self.groups.size()
            + self.keys.size()
            + values
            + self.states.size()
            + self.emitted_bytes
            + self.emitted.len() * 16
            + self.counts.len() * 24
    }

    /// Sets the value last emitted for `group`.
    fn set_emitted(&mut self, group: usize, value: Option<Box<[u8]>>) {
        let new = value.as_ref().map_or(0, |v| v.len());
        let old = std::mem::replace(&mut self.emitted[group], value);
        self.emitted_bytes = self.emitted_bytes + new - old.map_or(0, |v| v.len());
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::{col, Column};
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::stream::message::Op;
    use crate::stream::operator::testing::snapshot_of;

    /// `SELECT k, count(*), max(v) FROM t GROUP BY k` over (k, v) rows.
    fn operator(retracting: bool, ttl: Option<Duration>) -> GroupAggregate {
        let input: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, true),
        ]));
        let ctx = SessionContext::new();
        let count = datafusion::functions_aggregate::count::count_udaf();
        let max = datafusion::functions_aggregate::min_max::max_udaf();
        let build = |udf: Arc<datafusion::logical_expr::AggregateUDF>, name: &str| {
            datafusion::physical_expr::aggregate::AggregateExprBuilder::new(
                udf,
                vec![col("v", &input).unwrap()],
            )
            .schema(input.clone())
            .alias(name)
            .build()
            .map(Arc::new)
            .unwrap()
        };
        let _ = ctx;
        let calls = Arc::new(AggregateCalls {
            keys: vec![Arc::new(Column::new("k", 0))],
            key_schema: Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)])),
            aggregates: vec![build(count, "n"), build(max, "top")],
            filters: vec![None, None],
        });
        let output: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new("top", DataType::Int64, true),
        ]));
        GroupAggregate::try_new(calls, input, output, true, retracting, ttl).unwrap()
    }

    fn batch(rows: &[(&str, i64, Op)]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, true),
        ]));
        let data = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap();
        ChangeBatch {
            rows: data,
            watermarks: None,
            ops: Some(Int8Array::from_iter_values(rows.iter().map(|r| r.2 as i8))),
        }
    }

    fn lines(out: &[ChangeBatch]) -> Vec<String> {
        crate::stream::message::change_lines(out)
    }

    #[test]
    fn retractions_correct_every_aggregate_and_delete_empty_keys() {
        let mut op = operator(true, None);
        let mut out = Vec::new();
        op.process(
            0,
            batch(&[
                ("a", 5, Op::Insert),
                ("a", 9, Op::Insert),
                ("b", 1, Op::Insert),
            ]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I a,2,9", "+I b,1,1"]);
        out.clear();
        // max must fall back to 5 when 9 is retracted; b loses its only row.
        op.process(
            0,
            batch(&[("a", 9, Op::Delete), ("b", 1, Op::UpdateBefore)]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["-U a,2,9", "-D b,1,1", "+U a,1,5"]);
        out.clear();
        // A key that changes and changes back within an epoch emits nothing.
        op.process(
            0,
            batch(&[("a", 7, Op::Insert), ("a", 7, Op::Delete)]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert!(out.is_empty(), "{:?}", lines(&out));
        // b comes back as a new key.
        op.process(0, batch(&[("b", 4, Op::Insert)]), &mut out)
            .unwrap();
        op.on_end(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I b,1,4"]);
    }

    #[test]
    fn inserts_fold_into_accumulators_and_ttl_forgets_idle_keys() {
        let mut op = operator(false, Some(Duration::from_millis(50)));
        let mut out = Vec::new();
        op.process(
            0,
            batch(&[("a", 5, Op::Insert), ("b", 2, Op::Insert)]),
            &mut out,
        )
        .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I a,1,5", "+I b,1,2"]);
        out.clear();
        op.process(0, batch(&[("a", 8, Op::Insert)]), &mut out)
            .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["-U a,1,5", "+U a,2,8"]);
        out.clear();
        let full = op.state_size();
        std::thread::sleep(Duration::from_millis(80));
        op.process(0, batch(&[("a", 1, Op::Insert)]), &mut out)
            .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["-U a,2,8", "+U a,3,8"]);
        out.clear();
        assert!(op.state_size() < full, "{} !< {full}", op.state_size());
        // b was forgotten: it starts over, silently for its old row (Flink's TTL).
        op.process(0, batch(&[("b", 3, Op::Insert)]), &mut out)
            .unwrap();
        op.on_barrier(&mut out).unwrap();
        assert_eq!(lines(&out), ["+I b,1,3"]);
    }

    #[test]
    fn restored_state_gives_the_same_output() {
        for retracting in [false, true] {
            let mut original = operator(retracting, None);
            let mut out = Vec::new();
            let first = [
                ("a", 5, Op::Insert),
                ("b", 2, Op::Insert),
                ("a", 7, Op::Insert),
            ];
            original.process(0, batch(&first), &mut out).unwrap();
            original.on_barrier(&mut out).unwrap();
            // Unemitted changes are part of the state too.
            original
                .process(0, batch(&[("c", 1, Op::Insert)]), &mut out)
                .unwrap();
            let state = original.snapshot().unwrap();
            let mut restored = operator(retracting, None);
            restored.restore(state).unwrap();
            restored.restored().unwrap();
            let next = if retracting {
                vec![("a", 7, Op::Delete), ("b", 9, Op::Insert)]
            } else {
                vec![("a", 1, Op::Insert), ("b", 9, Op::Insert)]
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (op, out) in [(&mut original, &mut a), (&mut restored, &mut b)] {
                op.process(0, batch(&next), out).unwrap();
                op.on_barrier(out).unwrap();
            }
            assert_eq!(lines(&a), lines(&b), "retracting: {retracting}");
            assert!(!a.is_empty());
        }
    }

    #[test]
    fn incremental_snapshots_hold_only_changed_keys_and_restore_in_order() {
        for retracting in [false, true] {
            let ttl = Some(Duration::from_millis(50));
            let mut original = operator(retracting, ttl);
            let mut out = Vec::new();
            let first: Vec<(&str, i64, Op)> = ["a", "b", "c", "d"]
                .iter()
                .map(|k| (*k, 1, Op::Insert))
                .collect();
            original.process(0, batch(&first), &mut out).unwrap();
            original.on_barrier(&mut out).unwrap();
            let mut layers = original.snapshot().unwrap();
            original
                .process(0, batch(&[("a", 4, Op::Insert)]), &mut out)
                .unwrap();
            original.on_barrier(&mut out).unwrap();
            let changes = original.snapshot_changes().unwrap().unwrap();
            assert_eq!(changes.len(), 1);
            assert_eq!(changes[0].num_rows(), 1, "only a changed");
            layers.extend(changes);
            // b, c and d idle past the TTL and go; b comes back.
            std::thread::sleep(Duration::from_millis(80));
            original
                .process(0, batch(&[("a", 2, Op::Insert)]), &mut out)
                .unwrap();
            original.on_barrier(&mut out).unwrap();
            original
                .process(0, batch(&[("b", 6, Op::Insert)]), &mut out)
                .unwrap();
            let changes = original.snapshot_changes().unwrap().unwrap();
            let kinds: Vec<(String, usize)> = changes
                .iter()
                .map(|b| (snapshot::kind(b).unwrap(), b.num_rows()))
                .collect();
            assert_eq!(
                kinds,
                [("removed".to_string(), 3), ("groups".to_string(), 2)]
            );
            layers.extend(changes);
            let mut restored = operator(retracting, ttl);
            restored.restore(layers).unwrap();
            restored.restored().unwrap();
            let next = [
                ("a", 1, Op::Insert),
                ("b", 1, Op::Insert),
                ("c", 1, Op::Insert),
            ];
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for (op, out) in [(&mut original, &mut a), (&mut restored, &mut b)] {
                op.process(0, batch(&next), out).unwrap();
                op.on_barrier(out).unwrap();
            }
            assert_eq!(lines(&a), lines(&b), "retracting: {retracting}");
            assert_eq!(lines(&a).len(), 4, "{:?}", lines(&a));
            // Through TTL expiry, restores and retractions, the bytes counted as they
            // change are those held.
            for op in [&original, &restored] {
                assert_eq!(op.emitted_bytes, recounted_emitted(op));
                if let Values::Multisets {
                    rows, rows_bytes, ..
                } = &op.values
                {
                    let held: usize = rows.iter().flat_map(|s| s.keys()).map(row_bytes).sum();
                    assert_eq!(*rows_bytes, held);
                    assert!(held > 0);
                }
            }
        }
    }

    fn recounted_emitted(op: &GroupAggregate) -> usize {
        op.emitted.iter().flatten().map(|e| e.len()).sum()
    }

    /// `operator`, under the sled state backend when `memory` (bytes) is given, where
    /// every look for unused groups counts (no minimum idle time).
    fn operator_in(retracting: bool, memory: Option<usize>) -> GroupAggregate {
        let backend = memory.map(|memory| SledBackend {
            root: std::env::temp_dir().join("weir-group-agg-tests"),
            memory,
        });
        let mut op = operator(retracting, None)
            .with_backend(backend.as_ref())
            .unwrap();
        if let Some(spill) = op.spill.as_mut() {
            spill.idle = crate::stream::state_backend::IdleClock::new(Duration::ZERO);
        }
        op
    }

    /// Epochs of rows: inserts, and (retracting) deletes of rows inserted before; key b
    /// loses all its rows.
    fn epochs(retracting: bool) -> Vec<Vec<(&'static str, i64, Op)>> {
        use Op::{Delete as D, Insert as I};
        let mut epochs = vec![
            vec![("a", 1, I), ("b", 2, I), ("c", 3, I), ("d", 4, I)],
            vec![("a", 5, I), ("e", 6, I)],
            vec![("b", 7, I), ("f", 8, I)],
            vec![("c", 9, I), ("a", 10, I), ("g", 1, I)],
        ];
        if retracting {
            epochs[2].push(("a", 5, D));
            epochs[3].extend([("b", 2, D), ("b", 7, D)]);
        }
        epochs
    }

    /// The epoch's changes, sorted: keys come out in the order of their groups, which
    /// groups coming back from disk change.
    fn run_epoch(op: &mut GroupAggregate, rows: &[(&str, i64, Op)]) -> Vec<String> {
        let mut out = Vec::new();
        op.process(0, batch(rows), &mut out).unwrap();
        op.on_barrier(&mut out).unwrap();
        let mut lines = lines(&out);
        lines.sort();
        lines
    }

    fn group_rows(batches: &[RecordBatch]) -> usize {
        batches
            .iter()
            .filter(|b| snapshot::kind(b).unwrap() == "groups")
            .map(|b| b.num_rows())
            .sum()
    }

    #[test]
    fn the_sled_backend_keeps_groups_beyond_memory_on_disk_and_brings_them_back() {
        for retracting in [false, true] {
            let mut plain = operator_in(retracting, None);
            let expected: Vec<Vec<String>> = epochs(retracting)
                .iter()
                .map(|e| run_epoch(&mut plain, e))
                .collect();
            for memory in [0, 150] {
                let mut op = operator_in(retracting, Some(memory));
                let mut seen = std::collections::HashSet::new();
                for (e, rows) in epochs(retracting).iter().enumerate() {
                    assert_eq!(
                        run_epoch(&mut op, rows),
                        expected[e],
                        "{retracting} {memory}"
                    );
                    let spill = op.spill.as_ref().unwrap();
                    // Keys of earlier epochs: brought back from disk, used again.
                    let returned: std::collections::HashSet<&str> = rows
                        .iter()
                        .map(|r| r.0)
                        .filter(|k| seen.contains(k))
                        .collect();
                    seen.extend(rows.iter().map(|r| r.0));
                    if memory == 0 {
                        // After a barrier only groups brought back stay in memory.
                        assert!(op.groups.len() <= returned.len(), "{}", op.groups.len());
                        assert!(spill.bytes() > 0);
                    }
                }
            }
        }
    }

    #[test]
    fn groups_brought_back_from_disk_stay_while_in_use() {
        use crate::stream::operator::testing::brought_back_state_stays_while_in_use;
        brought_back_state_stays_while_in_use(
            &mut operator_in(false, Some(0)),
            |op, rows| {
                let rows: Vec<_> = rows.iter().map(|&(k, v)| (k, v, Op::Insert)).collect();
                // A new result per key, an update (two rows) for a key seen before.
                assert!(!run_epoch(op, &rows).is_empty());
            },
            |op| (op.groups.len(), op.spill.as_ref().unwrap().store_len()),
        );
    }

    #[test]
    fn groups_that_outgrow_the_budget_between_barriers_emit_early_and_go_to_disk() {
        use crate::stream::operator::testing::leave_the_same_rows;
        use crate::stream::state_backend::EarlyEmitMark;
        for retracting in [false, true] {
            let mut plain = operator_in(retracting, None);
            let mut early = operator_in(retracting, Some(0));
            let spill = early.spill.as_mut().unwrap();
            // Past what stayed in memory at all, measured after every row.
            spill.early_emit = EarlyEmitMark::with_slack(0, 0);
            spill.measure_every_rows = 1;
            // Results go out before the barrier, and groups a row did not touch to
            // disk: only its group stays.
            let row_by_row = epochs(retracting)
                .iter()
                .map(|rows| rows.iter().map(|row| batch(&[*row])).collect())
                .collect();
            leave_the_same_rows(&mut plain, &mut early, row_by_row, |op| {
                assert!(op.groups.len() <= 1, "{}", op.groups.len());
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
                (Some(150), Some(150)),
            ] {
                let epochs = epochs(retracting);
                let mut original = operator_in(retracting, memory);
                run_epoch(&mut original, &epochs[0]);
                let mut layers = vec![snapshot_of(&mut original, true)];
                for rows in &epochs[1..3] {
                    run_epoch(&mut original, rows);
                    let changes = snapshot_of(&mut original, false);
                    // Only the keys the epoch touched, wherever they are.
                    let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.0).collect();
                    assert_eq!(group_rows(&changes), keys.len(), "{memory:?}");
                    layers.push(changes);
                }
                let mut restored = operator_in(retracting, restored_memory);
                for layer in layers {
                    restored.restore(layer).unwrap();
                }
                restored.restored().unwrap();
                let got = run_epoch(&mut restored, &epochs[3]);
                assert_eq!(
                    got,
                    run_epoch(&mut original, &epochs[3]),
                    "retracting {retracting}, {memory:?} then {restored_memory:?}"
                );
                assert!(!got.is_empty());
            }
        }
    }

    #[test]
    fn a_key_removed_twice_in_one_layer_goes_once_under_the_sled_backend() {
        let mut original = operator_in(true, Some(0));
        run_epoch(&mut original, &[("a", 5, Op::Insert), ("b", 1, Op::Insert)]);
        let whole = snapshot_of(&mut original, true);
        let mut restored = operator_in(true, Some(0));
        let keys: ArrayRef = Arc::new(StringArray::from(vec!["a"]));
        let encoded = restored.key_converter.convert_columns(&[keys]).unwrap();
        let a = encoded.row(0).as_ref().to_vec();
        let removed = snapshot::batch(
            "removed",
            &[],
            vec![Arc::new(BinaryArray::from_iter_values([&a, &a]))],
        )
        .unwrap();
        restored.restore(whole).unwrap();
        restored.restore(vec![removed]).unwrap();
        restored.restored().unwrap();
        assert!(restored.state_size() < 1 << 20, "{}", restored.state_size());
        assert_eq!(
            run_epoch(&mut restored, &[("a", 2, Op::Insert), ("b", 3, Op::Insert)]),
            ["+I a,1,2", "+U b,2,3", "-U b,1,1"]
        );
    }
}
