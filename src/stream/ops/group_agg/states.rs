//! Partial aggregate states per group, kept so that reading a few groups costs only them.
//!
//! DataFusion's GroupsAccumulators give their state only for every group at once and
//! destructively (`EmitTo::All`): evaluating or snapshotting the groups changed in an
//! epoch by taking every state out and merging it back cost every group at every barrier,
//! so a checkpoint's duration grew with the state, not with what changed. Here rows fold
//! into accumulators over only the groups changed since the last settle ("pending",
//! indexed locally). A settle merges each pending group's settled state with what it
//! folded since and appends the result to a log of state columns (segments), noting each
//! group's place in it; reading any groups' states gathers their rows from the segments.
//! A row left behind by a newer state is garbage: a segment holding only garbage is
//! dropped, and once garbage outweighs live rows every live row is rewritten into one
//! segment, which the settles that made the garbage pay for.

use std::sync::Arc;

use datafusion::arrow::array::{new_empty_array, Array, ArrayRef, BooleanArray};
use datafusion::arrow::compute::interleave;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;

use crate::stream::ops::grouped::accumulator_of;

/// A group that is not pending.
const NOT_PENDING: u32 = u32::MAX;
/// Garbage rows tolerated beyond the live ones before a rewrite (small states are not
/// rewritten at every settle).
const GARBAGE_SLACK: usize = 1 << 16;
/// Segments before a rewrite: one comes with each settle, and gathering reads a list of
/// them per column.
const MAX_SEGMENTS: usize = 1024;

/// Where a group's settled state is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// No state settled yet: it is the state of a group without rows.
    None,
    At {
        segment: u32,
        row: u32,
    },
}

struct Segment {
    /// Every aggregate's state columns, in order.
    columns: Vec<ArrayRef>,
    /// Rows still some group's settled state.
    live: usize,
}

pub struct GroupStates {
    exprs: Vec<Arc<AggregateFunctionExpr>>,
    /// State columns per aggregate.
    widths: Vec<usize>,
    argument_types: Vec<Vec<DataType>>,
    /// Accumulators over the pending groups.
    pending: Vec<Box<dyn GroupsAccumulator>>,
    /// The pending groups, by local index.
    pending_groups: Vec<usize>,
    /// Per group: its local index, or [`NOT_PENDING`].
    local: Vec<u32>,
    /// Local indices of the rows of the batch last staged.
    staged: Vec<usize>,
    /// Per group: where its settled state is.
    places: Vec<Place>,
    /// Dropped segments stay as `None`, so places keep their numbers.
    segments: Vec<Option<Segment>>,
    /// Every aggregate's state of a group without rows (one row each).
    empty: Vec<ArrayRef>,
    /// Rows of the segments there are, live or garbage.
    rows_held: usize,
    /// Garbage rows tolerated beyond the live ones ([`GARBAGE_SLACK`]).
    slack: usize,
}

impl GroupStates {
    pub fn try_new(exprs: Vec<Arc<AggregateFunctionExpr>>, input: &SchemaRef) -> Result<Self> {
        let widths = exprs
            .iter()
            .map(|e| Ok(e.state_fields()?.len()))
            .collect::<Result<Vec<_>>>()?;
        let argument_types = exprs
            .iter()
            .map(|e| {
                e.expressions()
                    .iter()
                    .map(|a| a.data_type(input))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut states = Self {
            pending: Vec::new(),
            exprs,
            widths,
            argument_types,
            pending_groups: Vec::new(),
            local: Vec::new(),
            staged: Vec::new(),
            places: Vec::new(),
            segments: Vec::new(),
            empty: Vec::new(),
            rows_held: 0,
            slack: GARBAGE_SLACK,
        };
        states.pending = states.fresh_accumulators()?;
        for (i, mut acc) in states.fresh_accumulators()?.into_iter().enumerate() {
            size(acc.as_mut(), &states.argument_types[i], 1)?;
            states.empty.extend(acc.state(EmitTo::All)?);
        }
        Ok(states)
    }

    fn fresh_accumulators(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.exprs.iter().map(accumulator_of).collect()
    }

    /// How many state columns each aggregate has.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// State columns of aggregate `i` in a row of all of them.
    fn columns_of(&self, i: usize) -> std::ops::Range<usize> {
        let at = self.widths[..i].iter().sum::<usize>();
        at..at + self.widths[i]
    }

    /// Room for `groups` groups; new ones hold no rows.
    pub fn resize(&mut self, groups: usize) {
        self.places.resize(groups, Place::None);
        self.local.resize(groups, NOT_PENDING);
    }

    /// Room for `more` groups at once (a restore adds millions).
    pub fn reserve(&mut self, more: usize) {
        self.places.reserve_exact(more);
        self.local.reserve_exact(more);
    }

    /// Puts back stored partial states of `groups` (each once), `states[i]` aggregate
    /// `i`'s columns. Groups that hold nothing yet (as after a restore's interning) take
    /// the columns as they are, as a segment of their own; others merge them in.
    pub fn restore(&mut self, groups: &[usize], states: &[&[ArrayRef]]) -> Result<()> {
        if self.exprs.is_empty() || groups.is_empty() {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = states.iter().flat_map(|s| s.iter().cloned()).collect();
        // Columns of another type (a checkpoint of another version) cannot be gathered
        // with the others: merged, they take the accumulators' types.
        let fitting = columns.len() == self.empty.len()
            && columns
                .iter()
                .zip(&self.empty)
                .all(|(c, e)| c.len() == groups.len() && c.data_type() == e.data_type());
        if !fitting || !self.hold_nothing(groups) {
            self.stage(groups);
            for (i, state) in states.iter().enumerate() {
                self.merge(i, state)?;
            }
            return Ok(());
        }
        let segment = self.segments.len() as u32;
        for (row, &g) in groups.iter().enumerate() {
            self.places[g] = Place::At {
                segment,
                row: row as u32,
            };
        }
        self.segments.push(Some(Segment {
            columns,
            live: groups.len(),
        }));
        self.rows_held += groups.len();
        self.rewrite_if_wasteful()
    }

    /// Whether none of `groups` holds a state or is pending, and none is named twice.
    fn hold_nothing(&mut self, groups: &[usize]) -> bool {
        // A group looked at is marked with a local index no pending group has.
        let mut marked = 0;
        for &g in groups {
            if self.places[g] != Place::None || self.local[g] != NOT_PENDING {
                break;
            }
            self.local[g] = NOT_PENDING - 1;
            marked += 1;
        }
        for &g in &groups[..marked] {
            self.local[g] = NOT_PENDING;
        }
        marked == groups.len()
    }

    /// The groups of the rows that [`GroupStates::update`] and [`GroupStates::merge`]
    /// fold in next.
    pub fn stage(&mut self, groups: &[usize]) {
        self.staged.clear();
        if self.exprs.is_empty() {
            return;
        }
        for &g in groups {
            let mut l = self.local[g];
            if l == NOT_PENDING {
                l = self.pending_groups.len() as u32;
                self.local[g] = l;
                self.pending_groups.push(g);
            }
            self.staged.push(l as usize);
        }
    }

    /// Folds argument rows of the staged groups into aggregate `i`.
    pub fn update(
        &mut self,
        i: usize,
        args: &[ArrayRef],
        filter: Option<&BooleanArray>,
    ) -> Result<()> {
        let total = self.pending_groups.len();
        self.pending[i].update_batch(args, &self.staged, filter, total)
    }

    /// Merges partial states of the staged groups into aggregate `i`'s.
    pub fn merge(&mut self, i: usize, states: &[ArrayRef]) -> Result<()> {
        let total = self.pending_groups.len();
        self.pending[i].merge_batch(states, &self.staged, total)
    }

    /// Every aggregate's state columns, one row per group of `groups`.
    pub fn states(&mut self, groups: &[usize]) -> Result<Vec<Vec<ArrayRef>>> {
        self.settle()?;
        let columns = self.gather(groups.iter().map(|&g| self.places[g]))?;
        Ok((0..self.exprs.len())
            .map(|i| columns[self.columns_of(i)].to_vec())
            .collect())
    }

    /// Every aggregate's value, one row per group of `groups`.
    pub fn evaluate(&mut self, groups: &[usize]) -> Result<Vec<ArrayRef>> {
        let states = self.states(groups)?;
        let local: Vec<usize> = (0..groups.len()).collect();
        let mut values = Vec::with_capacity(states.len());
        for (i, (mut acc, state)) in self
            .fresh_accumulators()?
            .into_iter()
            .zip(states)
            .enumerate()
        {
            size(acc.as_mut(), &self.argument_types[i], groups.len())?;
            acc.merge_batch(&state, &local, groups.len())?;
            values.push(acc.evaluate(EmitTo::All)?);
        }
        Ok(values)
    }

    /// Keeps the groups `keep` (ascending), renumbered from 0.
    pub fn compact(&mut self, keep: &[usize]) -> Result<()> {
        self.settle()?;
        self.places = keep.iter().map(|&g| self.places[g]).collect();
        self.local = vec![NOT_PENDING; keep.len()];
        // The operator's compaction costs every group anyway (it re-interns their keys):
        // the kept states are rewritten now, so that the memory of the others goes with
        // them (the sled backend measures it right after moving groups out).
        self.rewrite()
    }

    pub fn size(&self) -> usize {
        self.pending.iter().map(|a| a.size()).sum::<usize>()
            + self
                .segments
                .iter()
                .flatten()
                .flat_map(|s| &s.columns)
                .map(|c| crate::stream::column_bytes(c.as_ref()))
                .sum::<usize>()
            + self.places.capacity() * std::mem::size_of::<Place>()
            + self.local.capacity() * 4
    }

    /// Merges what the pending groups folded into their settled states.
    fn settle(&mut self) -> Result<()> {
        let k = self.pending_groups.len();
        if k == 0 {
            return Ok(());
        }
        let fresh = self.fresh_accumulators()?;
        let mut pending = std::mem::replace(&mut self.pending, fresh);
        for (i, acc) in pending.iter_mut().enumerate() {
            // Every pending group gets a row, whatever the accumulator last heard.
            size(acc.as_mut(), &self.argument_types[i], k)?;
        }
        let settled: Vec<(usize, Place)> = self
            .pending_groups
            .iter()
            .enumerate()
            .map(|(l, &g)| (l, self.places[g]))
            .filter(|(_, place)| *place != Place::None)
            .collect();
        let mut columns = Vec::with_capacity(self.empty.len());
        if settled.is_empty() {
            // New groups only: what they folded is their state.
            for acc in &mut pending {
                columns.extend(acc.state(EmitTo::All)?);
            }
        } else {
            // The settled state first, then what came since (order-sensitive aggregates,
            // such as array_agg, keep the rows' order).
            let before = self.gather(settled.iter().map(|(_, place)| *place))?;
            let locals: Vec<usize> = settled.iter().map(|(l, _)| *l).collect();
            let all: Vec<usize> = (0..k).collect();
            for (i, acc) in pending.iter_mut().enumerate() {
                let mut merged = accumulator_of(&self.exprs[i])?;
                // Sized first: groups of no settled state must not count as having one.
                size(merged.as_mut(), &self.argument_types[i], k)?;
                merged.merge_batch(&before[self.columns_of(i)], &locals, k)?;
                merged.merge_batch(&acc.state(EmitTo::All)?, &all, k)?;
                columns.extend(merged.state(EmitTo::All)?);
            }
        }
        if let Some(wrong) = columns.iter().find(|c| c.len() != k) {
            return Err(DataFusionError::Internal(format!(
                "an accumulator gave {} states for {k} groups",
                wrong.len()
            )));
        }
        let segment = self.segments.len() as u32;
        let pending_groups = std::mem::take(&mut self.pending_groups);
        for (l, &g) in pending_groups.iter().enumerate() {
            self.release(self.places[g]);
            self.places[g] = Place::At {
                segment,
                row: l as u32,
            };
            self.local[g] = NOT_PENDING;
        }
        self.segments.push(Some(Segment { columns, live: k }));
        self.rows_held += k;
        self.pending_groups = pending_groups;
        self.pending_groups.clear();
        self.rewrite_if_wasteful()
    }

    /// A group's state left `place`.
    fn release(&mut self, place: Place) {
        let Place::At { segment, .. } = place else {
            return;
        };
        let slot = &mut self.segments[segment as usize];
        if let Some(s) = slot.as_mut() {
            s.live -= 1;
            if s.live == 0 {
                self.rows_held -= s.columns.first().map_or(0, |c| c.len());
                *slot = None;
            }
        }
    }

    /// Rows of the segments that some group still holds.
    fn live_rows(&self) -> usize {
        self.segments.iter().flatten().map(|s| s.live).sum()
    }

    /// Every live row in one segment, when garbage outweighs them or segments pile up.
    fn rewrite_if_wasteful(&mut self) -> Result<()> {
        let live = self.live_rows();
        let segments = self.segments.iter().flatten().count();
        if self.rows_held <= 2 * live + self.slack && segments < MAX_SEGMENTS {
            return Ok(());
        }
        self.rewrite()
    }

    /// Every live row in one segment.
    fn rewrite(&mut self) -> Result<()> {
        let stated: Vec<usize> = (0..self.places.len())
            .filter(|&g| self.places[g] != Place::None)
            .collect();
        let columns = self.gather(stated.iter().map(|&g| self.places[g]))?;
        for (row, &g) in stated.iter().enumerate() {
            self.places[g] = Place::At {
                segment: 0,
                row: row as u32,
            };
        }
        self.segments = vec![Some(Segment {
            columns,
            live: stated.len(),
        })];
        self.rows_held = stated.len();
        Ok(())
    }

    /// Every aggregate's state columns at `places`, in order.
    fn gather(&self, places: impl Iterator<Item = Place>) -> Result<Vec<ArrayRef>> {
        // Arrays to gather from: the empty state, then every segment there is.
        let mut position = vec![usize::MAX; self.segments.len()];
        let mut present = Vec::new();
        for (s, segment) in self.segments.iter().enumerate() {
            if let Some(segment) = segment {
                position[s] = present.len() + 1;
                present.push(segment);
            }
        }
        let indices = places
            .map(|place| match place {
                Place::None => Ok((0, 0)),
                Place::At { segment, row } => match position[segment as usize] {
                    usize::MAX => Err(DataFusionError::Internal(
                        "a group's state is in a dropped segment".into(),
                    )),
                    at => Ok((at, row as usize)),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        (0..self.empty.len())
            .map(|c| {
                let arrays: Vec<&dyn Array> = std::iter::once(self.empty[c].as_ref())
                    .chain(present.iter().map(|s| s.columns[c].as_ref()))
                    .collect();
                Ok(interleave(&arrays, &indices)?)
            })
            .collect()
    }
}

/// Sizes `acc` for `groups` groups, those without rows included. The FILTER mask, empty
/// as the rows, matters: without one DataFusion's accumulators assume every group they
/// are sized for has seen a value.
pub fn size(acc: &mut dyn GroupsAccumulator, arguments: &[DataType], groups: usize) -> Result<()> {
    let empty: Vec<ArrayRef> = arguments.iter().map(new_empty_array).collect();
    acc.update_batch(
        &empty,
        &[],
        Some(&BooleanArray::from(Vec::<bool>::new())),
        groups,
    )
}

#[cfg(test)]
pub(super) mod tests {
    use datafusion::arrow::array::{Int64Array, UInt32Array};
    use datafusion::arrow::compute::take;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::util::display::array_value_to_string;
    use datafusion::logical_expr::AggregateUDF;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    use super::*;

    /// `udf(v)` named `name`, over `input`'s column v.
    pub(in crate::stream::ops::group_agg) fn over_v(
        udf: Arc<AggregateUDF>,
        name: &str,
        input: &SchemaRef,
    ) -> Arc<AggregateFunctionExpr> {
        Arc::new(
            AggregateExprBuilder::new(udf, vec![col("v", input).unwrap()])
                .schema(input.clone())
                .alias(name)
                .build()
                .unwrap(),
        )
    }

    fn calls(input: &SchemaRef) -> Vec<Arc<AggregateFunctionExpr>> {
        let build = |udf: Arc<AggregateUDF>, name: &str| over_v(udf, name, input);
        use datafusion::functions_aggregate as f;
        vec![
            build(f::count::count_udaf(), "n"),
            build(f::sum::sum_udaf(), "total"),
            build(f::min_max::max_udaf(), "top"),
            build(f::min_max::min_udaf(), "bottom"),
            // Order-sensitive: a settle must merge a group's older rows first.
            build(f::array_agg::array_agg_udaf(), "all"),
        ]
    }

    fn text(values: &[ArrayRef], groups: usize) -> Vec<String> {
        (0..groups)
            .map(|g| {
                values
                    .iter()
                    .map(|v| array_value_to_string(v, g).unwrap())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    /// Rows fold over many epochs into a few groups each; some epochs read some groups
    /// (a settle), some drop groups (a compaction). Every group's values must be those of
    /// one DataFusion accumulator fed every row, and garbage must stay bounded.
    #[test]
    fn settled_states_equal_one_accumulator_over_every_row() {
        let input: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let exprs = calls(&input);
        let mut states = GroupStates::try_new(exprs.clone(), &input).unwrap();
        states.slack = 8;
        let mut reference: Vec<Box<dyn GroupsAccumulator>> =
            exprs.iter().map(|e| accumulator_of(e).unwrap()).collect();
        let mut groups = 0;
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let (mut rewrites, mut dropped) = (0, 0);
        for epoch in 0..200u64 {
            groups += next(3) as usize;
            states.resize(groups.max(1));
            let total = groups.max(1);
            // Hot groups change every epoch, the others now and then.
            let rows = 1 + next(40) as usize;
            let indices: Vec<usize> = (0..rows)
                .map(|_| {
                    if next(2) == 0 {
                        next(4.min(total as u64)) as usize
                    } else {
                        next(total as u64) as usize
                    }
                })
                .collect();
            let values: ArrayRef =
                Arc::new(Int64Array::from_iter((0..rows).map(|i| {
                    (i % 7 != 3).then_some((epoch * 100 + i as u64) as i64)
                })));
            states.stage(&indices);
            for (i, acc) in reference.iter_mut().enumerate() {
                states
                    .update(i, std::slice::from_ref(&values), None)
                    .unwrap();
                // With a filter: groups it is sized for that saw no row have no value.
                let all = BooleanArray::from(vec![true; rows]);
                acc.update_batch(std::slice::from_ref(&values), &indices, Some(&all), total)
                    .unwrap();
            }
            match next(4) {
                0 => {
                    // Read a few groups: they settle.
                    let some: Vec<usize> = (0..total).filter(|g| g % 3 == 0).collect();
                    states.evaluate(&some).unwrap();
                }
                1 if total > 4 => {
                    // Drop every group whose number is a multiple of 5, past the hot ones.
                    let keep: Vec<usize> = (0..total).filter(|g| *g < 4 || g % 5 != 0).collect();
                    states.compact(&keep).unwrap();
                    let picked = UInt32Array::from_iter_values(keep.iter().map(|&g| g as u32));
                    for acc in &mut reference {
                        let kept = acc
                            .state(EmitTo::All)
                            .unwrap()
                            .iter()
                            .map(|c| take(c, &picked, None).unwrap())
                            .collect::<Vec<_>>();
                        let local: Vec<usize> = (0..keep.len()).collect();
                        acc.merge_batch(&kept, &local, keep.len()).unwrap();
                    }
                    groups = keep.len();
                }
                _ => {}
            }
            let segments = states.segments.len();
            let held = states.rows_held;
            let all: Vec<usize> = (0..states.places.len()).collect();
            let ours = states.evaluate(&all).unwrap();
            if states.segments.len() == 1 && segments > 1 {
                rewrites += 1;
            }
            if states.segments.iter().any(Option::is_none) {
                dropped += 1;
            }
            let live = states.live_rows();
            assert!(
                states.rows_held <= 2 * live + states.slack,
                "{held} rows held"
            );
            let n = all.len();
            let theirs: Vec<ArrayRef> = reference
                .iter_mut()
                .map(|acc| {
                    let state = acc.state(EmitTo::All).unwrap();
                    acc.merge_batch(&state, &all, n).unwrap();
                    state
                })
                .zip(&exprs)
                .map(|(state, expr)| {
                    let mut fresh = accumulator_of(expr).unwrap();
                    fresh.merge_batch(&state, &all, n).unwrap();
                    fresh.evaluate(EmitTo::All).unwrap()
                })
                .collect();
            assert_eq!(text(&ours, n), text(&theirs, n), "epoch {epoch}");
        }
        assert!(
            rewrites > 0 && dropped > 0,
            "{rewrites} rewrites, {dropped} drops"
        );
    }

    #[test]
    fn groups_without_rows_have_the_values_of_no_rows() {
        let input: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        let mut states = GroupStates::try_new(calls(&input), &input).unwrap();
        states.resize(2);
        states.stage(&[1]);
        let one: ArrayRef = Arc::new(Int64Array::from(vec![4]));
        for i in 0..5 {
            states.update(i, std::slice::from_ref(&one), None).unwrap();
        }
        let values = states.evaluate(&[0, 1]).unwrap();
        assert_eq!(text(&values, 2), ["0    ", "1 4 4 4 [4]"]);
        // A state read for a snapshot comes back into groups holding nothing as it was,
        // kept as read (a segment of its own).
        let saved = states.states(&[1, 0]).unwrap();
        let saved: Vec<&[ArrayRef]> = saved.iter().map(Vec::as_slice).collect();
        let mut restored = GroupStates::try_new(calls(&input), &input).unwrap();
        restored.resize(3);
        restored.restore(&[0, 1], &saved).unwrap();
        assert_eq!(restored.segments.len(), 1);
        let values = restored.evaluate(&[1, 0]).unwrap();
        assert_eq!(text(&values, 2), ["0    ", "1 4 4 4 [4]"]);
        // Into groups holding something, or naming a group twice, states merge.
        restored.restore(&[0, 2], &saved).unwrap();
        let values = restored.evaluate(&[0, 1, 2]).unwrap();
        assert_eq!(text(&values, 3), ["2 8 4 4 [4, 4]", "0    ", "0    "]);
        restored.restore(&[2, 2], &saved).unwrap();
        let values = restored.evaluate(&[2]).unwrap();
        assert_eq!(text(&values, 1), ["1 4 4 4 [4]"]);
        assert!(restored.local.iter().all(|&l| l == NOT_PENDING));
    }

    /// States read back from a checkpoint share its message's buffer: they count what
    /// they hold, not that buffer once per column.
    #[test]
    fn restored_states_count_their_own_bytes() {
        use crate::stream::checkpoint::frame::{FrameReader, FrameWriter};
        let input: SchemaRef = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        use datafusion::functions_aggregate as f;
        let exprs = vec![
            over_v(f::count::count_udaf(), "n", &input),
            over_v(f::sum::sum_udaf(), "total", &input),
            over_v(f::min_max::max_udaf(), "top", &input),
        ];
        let groups: Vec<usize> = (0..10_000).collect();
        let mut states = GroupStates::try_new(exprs.clone(), &input).unwrap();
        states.resize(groups.len());
        states.stage(&groups);
        let values: ArrayRef = Arc::new(Int64Array::from_iter_values(0..10_000));
        for i in 0..exprs.len() {
            states
                .update(i, std::slice::from_ref(&values), None)
                .unwrap();
        }
        let columns: Vec<ArrayRef> = states.states(&groups).unwrap().concat();
        let held = states.size();
        let mut w = FrameWriter::default();
        w.batch(&crate::stream::snapshot::batch("states", &[], columns).unwrap())
            .unwrap();
        let read = FrameReader::new(&w.bytes).batch().unwrap();
        let (_, _, columns) = crate::stream::snapshot::parts(&read, 0).unwrap();
        let mut restored = GroupStates::try_new(exprs, &input).unwrap();
        restored.resize(groups.len());
        let per_call: Vec<&[ArrayRef]> = columns.chunks(1).collect();
        restored.restore(&groups, &per_call).unwrap();
        assert_eq!(restored.segments.len(), 1, "taken as read");
        assert!(
            restored.size() < held * 3 / 2,
            "{} against {held}",
            restored.size()
        );
        let values = restored.evaluate(&[9_999]).unwrap();
        assert_eq!(text(&values, 1), ["1 9999 9999"]);
    }
}
