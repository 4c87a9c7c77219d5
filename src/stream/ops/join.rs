//! Joins of two changelog streams: a symmetric hash join (Flink's StreamingJoinOperator)
//! for INNER, LEFT, RIGHT and FULL joins and for semi and anti joins, which doubles as an
//! interval join (Flink's TimeIntervalJoin) when the condition bounds one input's time
//! attribute by the other's.
//!
//! Each input keeps its rows by join key. A row probes the other input's rows with its
//! key; the non-equi condition is evaluated on all candidate pairs of a batch at once.
//! Outer, semi and anti joins count each stored row's matches, so a null-padded row is
//! emitted and retracted exactly when a row goes from no match to one and back. Output
//! rows are gathered with `interleave` from the input batch and the stored chunks.
//!
//! Regular joins have no time: they never drop rows as late, and keep state until the
//! state TTL (processing time since a row was last written) removes it without output.
//! Interval joins drop a row once the watermark shows that no on-time row of the other
//! input can match it; an unmatched row of an outer side is emitted null-padded then, so
//! insert-only inputs give insert-only output.

mod block_vec;
mod checkpoint;
mod side;
mod spill;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    new_null_array, Array, ArrayRef, BooleanArray, Int8Array, UInt32Array,
};
use datafusion::arrow::compute::{interleave, take_record_batch};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use self::side::{EntryId, Loc, Side};
use crate::stream::message::{ChangeBatch, Millis, Op, NO_WATERMARK};
use crate::stream::operator::{Operator, StateReader};
use crate::stream::source::to_millis;
use crate::stream::state_backend::SledBackend;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
    LeftSemi,
    LeftAnti,
    RightSemi,
    RightAnti,
}

impl JoinKind {
    /// Whether rows of input `side` appear without a match (null-padded).
    fn outer(self, side: usize) -> bool {
        matches!(
            (self, side),
            (JoinKind::Left, 0) | (JoinKind::Right, 1) | (JoinKind::Full, _)
        )
    }

    /// For semi and anti joins: the input whose rows are emitted, and whether it is anti.
    pub fn filtering(self) -> Option<(usize, bool)> {
        match self {
            JoinKind::LeftSemi => Some((0, false)),
            JoinKind::LeftAnti => Some((0, true)),
            JoinKind::RightSemi => Some((1, false)),
            JoinKind::RightAnti => Some((1, true)),
            _ => None,
        }
    }

    /// The inputs whose columns the output has.
    pub fn output_sides(self) -> [bool; 2] {
        match self.filtering() {
            Some((0, _)) => [true, false],
            Some(_) => [false, true],
            None => [true, true],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JoinKind::Inner => "inner",
            JoinKind::Left => "left outer",
            JoinKind::Right => "right outer",
            JoinKind::Full => "full outer",
            JoinKind::LeftSemi => "left semi",
            JoinKind::LeftAnti => "left anti",
            JoinKind::RightSemi => "right semi",
            JoinKind::RightAnti => "right anti",
        }
    }
}

/// The time bounds of an interval join: a left row with time `lt` matches right rows with
/// time `rt` where `lower <= rt - lt <= upper` (bounds may be a little wider than the
/// condition, which is evaluated exactly; they only decide when rows are dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub left_time: usize,
    pub right_time: usize,
    pub lower: Millis,
    pub upper: Millis,
}

impl Interval {
    fn time_column(&self, side: usize) -> usize {
        if side == 0 {
            self.left_time
        } else {
            self.right_time
        }
    }

    /// The watermark after which no on-time row of the other input can match a row of
    /// `side` with time `t`: rows later than the watermark are newer than it.
    fn deadline(&self, side: usize, t: Millis) -> Millis {
        if side == 0 {
            t.saturating_add(self.upper)
        } else {
            t.saturating_sub(self.lower)
        }
    }
}

/// What a join operator is planned with.
pub struct JoinSpec {
    pub kind: JoinKind,
    /// Equi-join keys of each input (same types on both sides); none for a theta join.
    pub keys: [Vec<Arc<dyn PhysicalExpr>>; 2],
    /// `IS NOT DISTINCT FROM` keys: NULL matches NULL.
    pub null_equals_null: bool,
    /// The non-equi condition, over the left columns followed by the right ones.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    pub inputs: [SchemaRef; 2],
    pub output: SchemaRef,
    pub interval: Option<Interval>,
    /// Per input: how long a row is kept after it was last written (processing time).
    pub ttl: [Option<Millis>; 2],
    /// Per input: whether it only ever inserts rows.
    pub insert_only: [bool; 2],
}

impl JoinSpec {
    /// Whether input `s`'s rows are found again by their whole encoding: to take one back,
    /// or to refresh its state TTL when it comes again. Insert-only inputs without a TTL
    /// keep each row as its own entry and never encode whole rows.
    fn finds_rows(&self, s: usize) -> bool {
        !self.insert_only[s] || self.ttl[s].is_some()
    }

    /// Whether the sled state backend can keep the rows beyond memory: those of a join
    /// with keys (records are per key).
    pub fn can_spill(&self) -> bool {
        !self.keys[0].is_empty()
    }
}

/// Processing time in milliseconds; tests substitute their own.
pub type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(crate::stream::message::wall_clock_ms)
}

/// Where one side of an output row comes from.
#[derive(Debug, Clone, Copy)]
enum Part {
    Input(u32),
    Stored(Loc),
    Null,
}

/// Output rows being collected: the change and each side's part.
#[derive(Default)]
struct Emitted {
    ops: Vec<i8>,
    parts: [Vec<Part>; 2],
}

impl Emitted {
    /// `copies` rows of `own` (input `a`'s part) joined with `other`.
    fn push(&mut self, a: usize, op: Op, own: Part, other: Part, copies: u32) {
        for _ in 0..copies {
            self.ops.push(op as i8);
            self.parts[a].push(own);
            self.parts[1 - a].push(other);
        }
    }
}

/// Encoded rows; no columns encode every row as the same empty key.
struct Encoded(Option<Rows>);

impl Encoded {
    fn new(converter: &Option<RowConverter>, columns: &[ArrayRef]) -> Result<Self> {
        Ok(Self(match converter {
            Some(c) => Some(c.convert_columns(columns)?),
            None => None,
        }))
    }

    fn get(&self, i: usize) -> &[u8] {
        match &self.0 {
            Some(rows) => rows.row(i).data(),
            None => &[],
        }
    }
}

fn converter(types: Vec<datafusion::arrow::datatypes::DataType>) -> Result<Option<RowConverter>> {
    if types.is_empty() {
        return Ok(None);
    }
    Ok(Some(RowConverter::new(
        types.into_iter().map(SortField::new).collect(),
    )?))
}

pub struct StreamJoin {
    spec: Arc<JoinSpec>,
    sides: [Side; 2],
    keys: Option<RowConverter>,
    rows: [Option<RowConverter>; 2],
    /// Left columns then right ones, all nullable: candidate pairs for the filter.
    pairs: SchemaRef,
    watermark: Millis,
    clock: Clock,
    last_sweep: Millis,
    /// Under the sled state backend: where rows beyond the memory budget go.
    spill: Option<spill::Spill>,
}

impl StreamJoin {
    pub fn try_new(spec: Arc<JoinSpec>, clock: Clock) -> Result<Self> {
        let key_types = spec.keys[0]
            .iter()
            .map(|k| k.data_type(&spec.inputs[0]))
            .collect::<Result<Vec<_>>>()?;
        let row_types = |s: usize| -> Vec<_> {
            spec.inputs[s]
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect()
        };
        let pairs = Arc::new(Schema::new(
            spec.inputs
                .iter()
                .flat_map(|s| s.fields().iter())
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            keys: converter(key_types)?,
            rows: [
                Self::row_converter(&spec, 0, row_types(0))?,
                Self::row_converter(&spec, 1, row_types(1))?,
            ],
            sides: [
                Side::new(spec.inputs[0].clone(), spec.finds_rows(0)),
                Side::new(spec.inputs[1].clone(), spec.finds_rows(1)),
            ],
            spec,
            pairs,
            watermark: NO_WATERMARK,
            clock,
            last_sweep: NO_WATERMARK,
            spill: None,
        })
    }

    /// Keeps rows beyond `backend`'s memory budget on disk, if [`JoinSpec::can_spill`].
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        if let Some(backend) = backend.filter(|_| self.spec.can_spill()) {
            let kind = self.spec.kind;
            let interval = self
                .spec
                .interval
                .map(|iv| (iv, [!kind.outer(0), !kind.outer(1)]));
            self.spill = spill::Spill::open(backend, &self.spec.inputs, interval)?;
        }
        Ok(self)
    }

    /// The encoder of input `s`'s whole rows, if its side finds rows by them.
    fn row_converter(
        spec: &JoinSpec,
        s: usize,
        types: Vec<datafusion::arrow::datatypes::DataType>,
    ) -> Result<Option<RowConverter>> {
        if spec.finds_rows(s) {
            converter(types)
        } else {
            Ok(None)
        }
    }

    fn now(&self) -> Millis {
        if self.spec.ttl.iter().any(|t| t.is_some()) {
            (self.clock)()
        } else {
            0
        }
    }

    /// Whether entry `id` of `side` is still within its TTL and, in an interval join,
    /// not past its deadline (rows brought back from disk may be, until the expiry).
    fn visible(&self, side: usize, id: EntryId, now: Millis) -> bool {
        let entry = self.sides[side].entry(id);
        self.spec.ttl[side].is_none_or(|ttl| entry.touched.saturating_add(ttl) > now)
            && self
                .spec
                .interval
                .is_none_or(|iv| iv.deadline(side, entry.time) >= self.watermark)
    }

    /// The join key columns of `batch` from input `side`.
    fn key_columns(&self, side: usize, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        self.spec.keys[side]
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(batch.num_rows()))
            .collect()
    }

    /// Columns of input `side` for output rows `parts`, gathered from the input batch
    /// (when `side` is the input), the stored chunks and a null row.
    fn side_columns(
        &self,
        side: usize,
        input: Option<&RecordBatch>,
        parts: &[Part],
    ) -> Result<Vec<ArrayRef>> {
        let store = &self.sides[side];
        let mut slot: HashMap<u64, usize> = HashMap::new();
        let mut chunks: Vec<u64> = Vec::new();
        let indices: Vec<(usize, usize)> = parts
            .iter()
            .map(|p| match *p {
                Part::Null => (0, 0),
                Part::Input(i) => (1, i as usize),
                Part::Stored((chunk, row)) => {
                    let s = *slot.entry(chunk).or_insert_with(|| {
                        chunks.push(chunk);
                        chunks.len() + 1
                    });
                    (s, row as usize)
                }
            })
            .collect();
        // Only input rows: a plain take.
        if let Some(input) = input {
            if parts.iter().all(|p| matches!(p, Part::Input(_))) {
                let idx = UInt32Array::from_iter_values(indices.iter().map(|i| i.1 as u32));
                return Ok(take_record_batch(input, &idx)?.columns().to_vec());
            }
        }
        let mut columns = Vec::with_capacity(store.schema().fields().len());
        for (c, field) in store.schema().fields().iter().enumerate() {
            let null = new_null_array(field.data_type(), 1);
            let mut arrays: Vec<&dyn Array> = vec![null.as_ref()];
            arrays.push(match input {
                Some(b) => b.column(c).as_ref(),
                None => null.as_ref(),
            });
            for &chunk in &chunks {
                arrays.push(store.chunk_rows(chunk).column(c).as_ref());
            }
            columns.push(interleave(&arrays, &indices)?);
        }
        Ok(columns)
    }

    /// The rows `emitted` as a batch of `schema`, with the columns of the `with` inputs.
    fn assemble(
        &self,
        a: usize,
        input: Option<&RecordBatch>,
        parts: &[Vec<Part>; 2],
        with: [bool; 2],
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let mut columns = Vec::with_capacity(schema.fields().len());
        for s in 0..2 {
            if with[s] {
                let own = if s == a { input } else { None };
                columns.extend(self.side_columns(s, own, &parts[s])?);
            }
        }
        crate::stream::batch_of(schema.clone(), columns, parts[0].len())
    }

    fn emit(
        &self,
        a: usize,
        input: Option<&RecordBatch>,
        emitted: Emitted,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if emitted.ops.is_empty() {
            return Ok(());
        }
        let rows = self.assemble(
            a,
            input,
            &emitted.parts,
            self.spec.kind.output_sides(),
            &self.spec.output,
        )?;
        let ops = emitted
            .ops
            .iter()
            .any(|&o| o != Op::Insert as i8)
            .then(|| Int8Array::from(emitted.ops));
        out.push(ChangeBatch {
            rows,
            watermarks: None,
            ops,
        });
        Ok(())
    }

    /// Candidate pairs (input row, stored entry of the other side) that satisfy the
    /// filter, in input row order.
    fn matches(
        &self,
        a: usize,
        batch: &RecordBatch,
        candidates: (Vec<u32>, Vec<EntryId>),
    ) -> Result<(Vec<u32>, Vec<EntryId>)> {
        let (rows, entries) = candidates;
        let Some(filter) = &self.spec.filter else {
            return Ok((rows, entries));
        };
        if rows.is_empty() {
            return Ok((rows, entries));
        }
        let b = 1 - a;
        let mut parts: [Vec<Part>; 2] = [Vec::new(), Vec::new()];
        parts[a] = rows.iter().map(|&i| Part::Input(i)).collect();
        parts[b] = entries
            .iter()
            .map(|&e| Part::Stored(self.sides[b].entry(e).loc))
            .collect();
        let pairs = self.assemble(a, Some(batch), &parts, [true, true], &self.pairs)?;
        let mask = filter.evaluate(&pairs)?.into_array(pairs.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| {
                DataFusionError::Plan("a join condition must be a boolean expression".into())
            })?;
        let keep = |k: usize| mask.is_valid(k) && mask.value(k);
        Ok((
            rows.iter()
                .enumerate()
                .filter(|(k, _)| keep(*k))
                .map(|(_, &r)| r)
                .collect(),
            entries
                .iter()
                .enumerate()
                .filter(|(k, _)| keep(*k))
                .map(|(_, &e)| e)
                .collect(),
        ))
    }

    /// Removes rows whose TTL passed, without output. Expired rows are already invisible
    /// to probes; this frees their memory, at most every eighth of the TTL.
    fn sweep(&mut self, now: Millis, force: bool) -> Result<()> {
        let Some(shortest) = self.spec.ttl.iter().flatten().min().copied() else {
            return Ok(());
        };
        if !force && now.saturating_sub(self.last_sweep) < (shortest / 8).max(1) {
            return Ok(());
        }
        self.last_sweep = now;
        for s in 0..2 {
            let Some(ttl) = self.spec.ttl[s] else {
                continue;
            };
            let side = &mut self.sides[s];
            for id in side.live_ids() {
                if side.entry(id).touched.saturating_add(ttl) <= now {
                    side.remove(id);
                }
            }
            side.settle()?;
            self.sweep_spilled(s, now.saturating_sub(ttl))?;
        }
        Ok(())
    }

    /// Interval joins: drops the rows no on-time row can match any more, emitting the
    /// unmatched rows of outer inputs null-padded. Under the sled backend the runs on
    /// disk the watermark made due follow, a group of runs at a time.
    fn expire(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        let Some(interval) = self.spec.interval else {
            return Ok(());
        };
        for s in 0..2 {
            self.expire_side(s, interval, out)?;
            self.bring_back_due(s, &mut |join| {
                join.expire_side(s, interval, out)?;
                join.shed(s)
            })?;
        }
        Ok(())
    }

    /// [`Self::expire`] of input `s`'s rows in memory. Null-padded rows come out by
    /// deadline, then in the order the rows arrived (serial), wherever they were kept.
    fn expire_side(
        &mut self,
        s: usize,
        interval: Interval,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let due: Vec<Millis> = self.sides[s]
            .deadlines
            .range(..self.watermark)
            .map(|(d, _)| *d)
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::new();
        for d in due {
            let listed = self.sides[s].deadlines.remove(&d).unwrap_or_default();
            let side = &self.sides[s];
            ids.extend(
                listed.into_iter().filter(|&id| {
                    side.is_live(id) && interval.deadline(s, side.entry(id).time) == d
                }),
            );
        }
        ids.sort_unstable();
        ids.dedup();
        if self.spec.kind.outer(s) {
            let side = &self.sides[s];
            let mut unmatched: Vec<_> = ids
                .iter()
                .map(|&id| (side.entry(id), id))
                .filter(|(e, _)| e.matches == 0)
                .map(|(e, id)| ((interval.deadline(s, e.time), side.serial(id)), e))
                .collect();
            unmatched.sort_unstable_by_key(|(order, _)| *order);
            let mut emitted = Emitted::default();
            for (_, e) in unmatched {
                emitted.push(s, Op::Insert, Part::Stored(e.loc), Part::Null, e.count);
            }
            self.emit(s, None, emitted, out)?;
        }
        for id in ids {
            self.sides[s].remove(id);
        }
        self.sides[s].settle()
    }
}

impl Operator for StreamJoin {
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let (a, b) = (input, 1 - input);
        let now = self.now();
        self.sweep(now, false)?;
        let spec = self.spec.clone();
        let rows = &batch.rows;
        let key_columns = self.key_columns(a, rows)?;
        let keys = Encoded::new(&self.keys, &key_columns)?;
        let full = Encoded::new(&self.rows[a], rows.columns())?;
        // Under the sled backend, the keys this batch probes come back first, and those
        // it may find its own rows under (an insert-only input without a TTL only adds).
        self.bring_back_rows(b, &keys, n)?;
        if spec.finds_rows(a) {
            self.bring_back_rows(a, &keys, n)?;
        }

        // Rows that can match at all: no NULL key (unless NULL equals NULL), a time.
        let mut matchable = vec![true; n];
        if !spec.null_equals_null {
            for column in key_columns.iter().filter(|c| c.null_count() > 0) {
                for (i, m) in matchable.iter_mut().enumerate() {
                    *m &= column.is_valid(i);
                }
            }
        }
        let times = match &spec.interval {
            Some(iv) => {
                let t = to_millis(rows.column(iv.time_column(a)))?;
                for (i, m) in matchable.iter_mut().enumerate() {
                    *m &= t.is_valid(i);
                }
                Some(t)
            }
            None => None,
        };
        let time = |i: usize| times.as_ref().map_or(0, |t| t.value(i));
        // Interval joins keep a row only while an on-time row of the other input can
        // still match it; a late row probes but is not kept.
        let storable: Vec<bool> = (0..n)
            .map(|i| {
                !batch.retracts(i)
                    && matchable[i]
                    && spec
                        .interval
                        .is_none_or(|iv| self.watermark <= iv.deadline(a, time(i)))
            })
            .collect();

        let mut candidates = (Vec::new(), Vec::new());
        for i in (0..n).filter(|&i| matchable[i]) {
            for &e in self.sides[b].candidates(keys.get(i)) {
                if self.visible(b, e, now) {
                    candidates.0.push(i as u32);
                    candidates.1.push(e);
                }
            }
        }
        let (pair_rows, pair_entries) = self.matches(a, rows, candidates)?;

        let kept: Vec<u32> = (0..n as u32).filter(|&i| storable[i as usize]).collect();
        let mut position = vec![u32::MAX; n];
        for (p, &i) in kept.iter().enumerate() {
            position[i as usize] = p as u32;
        }
        let chunk = if kept.is_empty() {
            None
        } else {
            let taken = take_record_batch(rows, &UInt32Array::from(kept))?;
            Some(self.sides[a].push_chunk(taken))
        };

        let ttl = spec.ttl;
        let kind = spec.kind;
        let filtering = kind.filtering();
        let (a_outer, b_outer) = (kind.outer(a), kind.outer(b));
        let mut emitted = Emitted::default();
        let [left, right] = &mut self.sides;
        let (own, other) = if a == 0 { (left, right) } else { (right, left) };
        let mut p = 0;
        for i in 0..n {
            let start = p;
            while p < pair_rows.len() && pair_rows[p] as usize == i {
                p += 1;
            }
            let matched = &pair_entries[start..p];
            let assoc: i64 = matched.iter().map(|&e| other.entry(e).count as i64).sum();
            let me = Part::Input(i as u32);
            let op = match batch.ops.as_ref().map(|o| o.value(i)) {
                Some(code) if code == Op::UpdateBefore as i8 => Op::UpdateBefore,
                Some(code) if code == Op::UpdateAfter as i8 => Op::UpdateAfter,
                Some(code) if code == Op::Delete as i8 => Op::Delete,
                _ => Op::Insert,
            };
            let accumulate = !batch.retracts(i);
            let stored = |e: EntryId, other: &Side| Part::Stored(other.entry(e).loc);

            // Own state first: the row is added or taken back.
            if accumulate {
                if storable[i] {
                    let visible = |id: EntryId, own: &Side| {
                        ttl[a].is_none_or(|t| own.entry(id).touched.saturating_add(t) > now)
                    };
                    match own.find(full.get(i)) {
                        Some(id) => {
                            let fresh = visible(id, own);
                            let e = own.entry_mut(id);
                            e.count = if fresh { e.count + 1 } else { 1 };
                            e.matches = assoc;
                            e.touched = now;
                        }
                        None => {
                            let loc = (chunk.expect("a chunk for kept rows"), position[i]);
                            let id =
                                own.insert(keys.get(i), full.get(i), loc, assoc, (now, time(i)));
                            if let Some(iv) = &spec.interval {
                                own.deadlines
                                    .entry(iv.deadline(a, time(i)))
                                    .or_default()
                                    .push(id);
                            }
                        }
                    }
                }
            } else if let Some(id) = own.find(full.get(i)) {
                let fresh = ttl[a].is_none_or(|t| own.entry(id).touched.saturating_add(t) > now);
                if fresh {
                    own.retract(id, now);
                } else {
                    own.remove(id);
                }
            }

            if let Some((kept_side, anti)) = filtering {
                if a == kept_side {
                    // The row is emitted (or retracted) as it is when it has matches
                    // (semi) or none (anti).
                    if (assoc > 0) != anti {
                        emitted.push(a, op, me, Part::Null, 1);
                    }
                } else {
                    for &e in matched {
                        let entry = other.entry_mut(e);
                        let copies = entry.count;
                        let before = entry.matches;
                        entry.matches = if accumulate {
                            before + 1
                        } else {
                            (before - 1).max(0)
                        };
                        entry.touched = now;
                        let change = match (accumulate, before) {
                            (true, 0) => Some(if anti { Op::Delete } else { Op::Insert }),
                            (false, 1) => Some(if anti { Op::Insert } else { Op::Delete }),
                            _ => None,
                        };
                        if let Some(change) = change {
                            emitted.push(b, change, stored(e, other), Part::Null, copies);
                        }
                    }
                }
                continue;
            }

            if spec.interval.is_some() {
                // Insert-only inputs: a null-padded row is emitted only once it can no
                // longer be matched (here for late rows, otherwise when it expires).
                if accumulate {
                    for &e in matched {
                        if b_outer {
                            other.entry_mut(e).matches += 1;
                        }
                        let copies = other.entry(e).count;
                        emitted.push(a, Op::Insert, me, stored(e, other), copies);
                    }
                    if !storable[i] && a_outer && assoc == 0 {
                        emitted.push(a, Op::Insert, me, Part::Null, 1);
                    }
                    continue;
                }
            }

            if accumulate {
                if matched.is_empty() {
                    if a_outer {
                        emitted.push(a, Op::Insert, me, Part::Null, 1);
                    }
                    continue;
                }
                if b_outer {
                    for &e in matched {
                        let entry = other.entry_mut(e);
                        let (copies, before) = (entry.count, entry.matches);
                        entry.matches += 1;
                        entry.touched = now;
                        if before == 0 {
                            emitted.push(b, Op::Delete, stored(e, other), Part::Null, copies);
                        }
                    }
                }
                // The input's change passes through unless null-padded rows are replaced.
                let change = if a_outer || b_outer { Op::Insert } else { op };
                for &e in matched {
                    let copies = other.entry(e).count;
                    emitted.push(a, change, me, stored(e, other), copies);
                }
            } else {
                if matched.is_empty() {
                    if a_outer {
                        emitted.push(a, Op::Delete, me, Part::Null, 1);
                    }
                    continue;
                }
                let change = if a_outer { Op::Delete } else { op };
                for &e in matched {
                    let copies = other.entry(e).count;
                    emitted.push(a, change, me, stored(e, other), copies);
                }
                if b_outer {
                    for &e in matched {
                        let entry = other.entry_mut(e);
                        let (copies, before) = (entry.count, entry.matches);
                        entry.matches = (before - 1).max(0);
                        entry.touched = now;
                        if before == 1 {
                            emitted.push(b, Op::Insert, stored(e, other), Part::Null, copies);
                        }
                    }
                }
            }
        }
        self.emit(a, Some(rows), emitted, out)?;
        self.sides[a].settle()?;
        self.shed(a)?;
        self.shed(b)
    }

    fn on_watermark(&mut self, watermark: Millis, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.watermark = self.watermark.max(watermark);
        self.expire(out)
    }

    fn on_barrier(&mut self, _out: &mut Vec<ChangeBatch>) -> Result<()> {
        let now = self.now();
        self.sweep(now, false)
    }

    fn state_size(&self) -> usize {
        self.sides.iter().map(|s| s.size()).sum::<usize>()
            + self.spill.as_ref().map_or(0, |s| s.bytes())
    }

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.whole_snapshot()
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        self.changed_snapshot().map(Some)
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        self.state_row_keys(batch)
    }

    fn started_from(&mut self, epoch: u64, subtask: usize) {
        for side in &mut self.sides {
            side.set_origin(side::origin(epoch, subtask));
        }
    }

    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        self.spilled_snapshot(whole)
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        self.restore_layers(state)
    }

    fn restored(&mut self) -> Result<()> {
        self.finish_restore()
    }
}
