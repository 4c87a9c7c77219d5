//! SESSION window aggregation: per key, a row opens the window [ts, ts + gap) and merges
//! with every session it touches. A row is dropped as late only if the session it would
//! merge into has already closed (its end - 1 ms is at or below the watermark the row
//! meets). Sessions emit one insert-only row when the watermark closes them.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, UInt32Array};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{OwnedRow, Row, RowConverter, Rows};
use datafusion::common::{HashMap, HashSet, Result, ScalarValue};
use smallvec::{smallvec, SmallVec};

use super::grouped::OneGroup;
use super::grouped::{AggregateCalls, CallInputs, Partial};
use super::window_agg::OutputColumn;
use super::window_assign::millis_column;
use crate::stream::late::LateRecorder;
use crate::stream::message::{ChangeBatch, Millis, Op, NO_WATERMARK};
use crate::stream::operator::{Operator, StateReader};
use crate::stream::snapshot;
use crate::stream::source::to_millis;
use crate::stream::window::fired;
use spill::Spill;

mod record;
mod restore;
mod spill;

/// The kind of state batch holding a session of a snapshot of changes (its start, end
/// and the snapshot's number, then its partial state).
const CHANGED_SESSION: &str = "session-changed";
/// Kinds of state batch holding many sessions, one a row: columns start, end (and for
/// changes the snapshot's number), then the partial state. Sessions with emitted rows
/// are written one a batch (`session`, `session-changed`), each followed by its rows.
const SESSIONS: &str = "sessions";
const CHANGED_SESSIONS: &str = "sessions-changed";

struct Session {
    key: OwnedRow,
    start: Millis,
    end: Millis,
    state: OneGroup,
    /// What the session emitted when it closed, kept while it can still be corrected.
    emitted: Option<RecordBatch>,
    /// The end `by_end` lists it under: at most `end`, brought up to date only when the
    /// watermark passes it (rows that extend a session do not touch the index).
    listed_end: Millis,
    /// The bytes of memory `state_size` counts for it (itself, its key, state and
    /// emitted rows, and its entries in the operator's indexes).
    accounted: usize,
}

/// The bytes a session takes beside its key, state and emitted rows: itself and its
/// entries in `sessions`, `by_key` and `by_end`.
const SESSION_BYTES: usize = std::mem::size_of::<Session>() + 64;

impl Session {
    fn new(key: OwnedRow, start: Millis, end: Millis, state: OneGroup) -> Self {
        Session {
            key,
            start,
            end,
            state,
            emitted: None,
            listed_end: end,
            accounted: 0,
        }
    }

    /// Counts its memory again into `held` (all sessions'), after its state changed.
    fn recount(&mut self, held: &mut usize) {
        let emitted = self
            .emitted
            .as_ref()
            .map_or(0, RecordBatch::get_array_memory_size);
        let now = SESSION_BYTES + self.state.size() + self.key.as_ref().len() + emitted;
        *held = *held - self.accounted + now;
        self.accounted = now;
    }
}

pub struct SessionAggregate {
    calls: Arc<AggregateCalls>,
    gap: Millis,
    /// The input column holding each row's time.
    time_column: usize,
    output: Vec<OutputColumn>,
    schema: SchemaRef,
    converter: RowConverter,
    /// Ids are never reused, so rows of a session merged away can follow it. (foldhash
    /// maps, as the other operators': std's SipHash was 9 % of q11's profile.)
    sessions: HashMap<usize, Session>,
    next_id: usize,
    /// Each key's sessions, by the key's encoding: a row finds them without copying
    /// its key (most keys have one session).
    by_key: HashMap<Box<[u8]>, SmallVec<[usize; 1]>>,
    /// (listed end, session) of every open session, to find those the watermark closes.
    by_end: BTreeSet<(Millis, usize)>,
    /// The memory the sessions take (their `accounted` bytes),
    /// kept up to date as they change: summing a million sessions' sizes for each
    /// report of the state size was a sixteenth of a session job's time.
    held_bytes: usize,
    watermark: Millis,
    late: u64,
    /// Where dropped rows go, if the session named a late-data table.
    pub late_rows: Option<LateRecorder>,
    /// 'table.exec.emit.allow-lateness': closed sessions stay this long; a late row that
    /// merges into one retracts what it emitted and emits the corrected session.
    pub lateness: Millis,
    /// Emitted rows of sessions that late rows changed, to retract.
    retract: Vec<RecordBatch>,
    /// Closed sessions that late rows changed.
    dirty: BTreeSet<usize>,
    /// Sessions that changed since the previous snapshot (new, grown, emitted): a
    /// snapshot of changes holds their keys' sessions, each key's replacing those of
    /// earlier snapshots. Sessions that went without a new one of their key (closed,
    /// expired) are not named: a restore drops them again by its watermark.
    changed: HashSet<usize>,
    /// Snapshots taken, numbering them within a chain of snapshots.
    snapshots: i64,
    /// While restoring: the snapshot each key's sessions came from.
    restored_from: HashMap<Box<[u8]>, i64>,
    /// While restoring: the session restored last, whose emitted rows may follow.
    restored_last: Option<usize>,
    /// The sessions changed since the snapshot before the last one.
    snapshotted_changes: HashSet<usize>,
    /// Under the sled backend: where the sessions of keys beyond the budget go.
    spill: Option<Spill>,
}

impl SessionAggregate {
    pub fn try_new(
        calls: Arc<AggregateCalls>,
        gap: Millis,
        time_column: usize,
        output: Vec<OutputColumn>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let converter = crate::stream::row_converter(calls.key_schema.fields())?;
        Ok(Self {
            calls,
            gap,
            time_column,
            output,
            schema,
            converter,
            sessions: HashMap::default(),
            next_id: 0,
            by_key: HashMap::default(),
            by_end: BTreeSet::new(),
            held_bytes: 0,
            watermark: NO_WATERMARK,
            late: 0,
            late_rows: None,
            lateness: 0,
            retract: Vec::new(),
            dirty: BTreeSet::new(),
            changed: HashSet::default(),
            snapshots: 0,
            restored_from: HashMap::default(),
            restored_last: None,
            snapshotted_changes: HashSet::default(),
            spill: None,
        })
    }

    fn session(&self, id: usize) -> &Session {
        &self.sessions[&id]
    }

    /// Lists a new session (`Session::new`: listed under its end, nothing counted yet).
    fn insert(&mut self, mut session: Session) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        self.by_end.insert((session.listed_end, id));
        match self.by_key.get_mut(session.key.as_ref()) {
            Some(ids) => ids.push(id),
            None => {
                self.by_key
                    .insert(session.key.as_ref().into(), smallvec![id]);
            }
        }
        session.recount(&mut self.held_bytes);
        self.sessions.insert(id, session);
        self.changed.insert(id);
        id
    }

    /// Folds rows `offset..offset + len` of `inputs` into session `id` (one lookup of
    /// it: this runs for every session a batch touches).
    fn fold_in(&mut self, id: usize, inputs: &CallInputs, offset: usize, len: usize) -> Result<()> {
        let session = self.sessions.get_mut(&id).expect("live session");
        session.state.update_range(inputs, offset, len)?;
        session.recount(&mut self.held_bytes);
        Ok(())
    }

    /// Session `id` closed and emitted `rows`, kept while it can still be corrected.
    fn set_emitted(&mut self, id: usize, rows: RecordBatch) {
        let session = self.sessions.get_mut(&id).expect("live session");
        session.emitted = Some(rows);
        session.recount(&mut self.held_bytes);
        self.changed.insert(id);
    }

    /// Counts session `id`'s memory again, after its state changed.
    fn account(&mut self, id: usize) {
        let session = self.sessions.get_mut(&id).expect("live session");
        session.recount(&mut self.held_bytes);
    }

    /// Lists the sessions whose listed end plus `slack` the watermark passed under their
    /// end, so that the index's entries up to the watermark are exact.
    fn list_ends(&mut self, slack: Millis, watermark: Millis) {
        let stale: Vec<(Millis, usize)> = self
            .by_end
            .iter()
            .take_while(|(listed, _)| fired(*listed + slack, watermark))
            .filter(|(listed, id)| self.sessions[id].end != *listed)
            .copied()
            .collect();
        for (listed, id) in stale {
            self.by_end.remove(&(listed, id));
            let session = self.sessions.get_mut(&id).expect("live session");
            session.listed_end = session.end;
            self.by_end.insert((session.end, id));
        }
    }

    /// The keys (encoded) of the sessions a state batch holds, each with the number of
    /// the snapshot of changes it came from, if any.
    fn restored_keys(&self, batch: &RecordBatch) -> Result<Vec<(Vec<u8>, Option<i64>)>> {
        let kind = snapshot::kind(batch)?;
        let (heads, many) = match kind.as_str() {
            SESSIONS => (2, true),
            CHANGED_SESSIONS => (3, true),
            "session" => (2, false),
            CHANGED_SESSION => (3, false),
            _ => return Ok(Vec::new()),
        };
        let key_count = self.calls.key_schema.fields().len();
        let (keys, from): (_, Vec<Option<i64>>) = if many {
            let (_, _, columns) = snapshot::parts(batch, 0)?;
            let from = match heads {
                3 => snapshot::column::<Int64Array>(&columns, 2)?
                    .values()
                    .iter()
                    .map(|f| Some(*f))
                    .collect(),
                _ => vec![None; batch.num_rows()],
            };
            let keys = self
                .converter
                .convert_columns(&columns[heads..heads + key_count])?;
            (keys, from)
        } else {
            let (_, head, columns) = snapshot::parts(batch, heads)?;
            let keys = self.converter.convert_columns(&columns[..key_count])?;
            (keys, vec![(heads == 3).then(|| head[2])])
        };
        Ok(keys.iter().map(|k| k.data().to_vec()).zip(from).collect())
    }

    /// Puts back one batch of a snapshot.
    fn restore_batch(&mut self, batch: RecordBatch) -> Result<()> {
        let (kind, _, _) = snapshot::parts(&batch, 0)?;
        if kind == "emitted" {
            let (_, _, columns) = snapshot::parts(&batch, 0)?;
            let rows = crate::stream::batch_of(self.schema.clone(), columns, batch.num_rows())?;
            if let Some(session) = self.restored_last.and_then(|id| self.sessions.get_mut(&id)) {
                session.emitted = Some(rows);
                session.recount(&mut self.held_bytes);
            }
            return Ok(());
        }
        if kind == SESSIONS || kind == CHANGED_SESSIONS {
            let changed = kind == CHANGED_SESSIONS;
            let (_, _, columns) = snapshot::parts(&batch, 0)?;
            let heads = 2 + changed as usize;
            if self.restore_sessions_to_disk(&columns, heads)? {
                return Ok(());
            }
            let figure = |c: usize| -> Result<&Int64Array> { snapshot::column(&columns, c) };
            let (starts, ends) = (figure(0)?, figure(1)?);
            let from = if changed { Some(figure(2)?) } else { None };
            let partials = Partial::from_columns(&self.calls, &columns[heads..])?;
            let keys = self.converter.convert_columns(&partials.keys)?;
            for row in 0..batch.num_rows() {
                let partial = partials.slice(row);
                let bounds = (starts.value(row), ends.value(row));
                let from = from.map(|f| f.value(row));
                self.restore_session(bounds, from, keys.row(row).owned(), &partial)?;
            }
            return Ok(());
        }
        let heads = if kind == CHANGED_SESSION { 3 } else { 2 };
        let (kind, head, columns) = snapshot::parts(&batch, heads)?;
        if kind == "progress" {
            (self.watermark, self.late) = snapshot::read_progress(&head);
            return Ok(());
        }
        let from = (kind == CHANGED_SESSION).then(|| head[2]);
        let partial = Partial::from_columns(&self.calls, &columns)?;
        let key = self
            .converter
            .convert_columns(&partial.keys)?
            .row(0)
            .owned();
        self.restore_session((head[0], head[1]), from, key, &partial)?;
        Ok(())
    }

    /// Puts back a session of a snapshot: `bounds` (start, end), the number of the
    /// snapshot of changes it came from (whose sessions of a key replace those of
    /// earlier ones), its key and its partial state.
    fn restore_session(
        &mut self,
        (start, end): (Millis, Millis),
        from: Option<i64>,
        key: OwnedRow,
        partial: &Partial,
    ) -> Result<()> {
        let replaces = match from {
            Some(from) if self.restored_from.get(key.as_ref()) != Some(&from) => {
                self.restored_from.insert(key.as_ref().into(), from);
                true
            }
            _ => false,
        };
        if replaces {
            for id in self.by_key.get(key.as_ref()).cloned().unwrap_or_default() {
                self.remove(id);
            }
            self.forget_on_disk(key.as_ref())?;
        } else if !self.by_key.contains_key(key.as_ref()) {
            // Sessions of the key restored earlier may have gone to disk meanwhile.
            self.bring_back(&[key.as_ref()])?;
        }
        let mut state = self.calls.new_one_group()?;
        state.merge(&partial.states)?;
        self.restored_last = Some(self.insert(Session::new(key, start, end, state)));
        Ok(())
    }

    fn remove(&mut self, id: usize) -> Session {
        let session = self.sessions.remove(&id).expect("live session");
        self.held_bytes -= session.accounted;
        self.changed.remove(&id);
        self.by_end.remove(&(session.listed_end, id));
        if let Some(ids) = self.by_key.get_mut(session.key.as_ref()) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_key.remove(session.key.as_ref());
            }
        }
        session
    }

    /// Brings back from disk the sessions of the keys among `keys` that are not in memory.
    fn bring_back_keys_of(&mut self, keys: &Rows) -> Result<()> {
        if self.spill.as_ref().is_none_or(|s| s.bytes() == 0) {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let absent: Vec<&[u8]> = keys
            .iter()
            .map(|k| k.data())
            .filter(|k| !self.by_key.contains_key(*k) && seen.insert(k))
            .collect();
        self.bring_back(&absent)
    }

    /// Puts a row at `t` into its key's sessions; returns the session it joined, or
    /// `None` when that session has already closed.
    /// Sessions merged away go into `merged_away`, so rows assigned to them can follow.
    fn assign(
        &mut self,
        key: Row<'_>,
        t: Millis,
        watermark: Millis,
        merged_away: &mut Vec<usize>,
    ) -> Result<Option<usize>> {
        let (mut start, mut end) = (t, t + self.gap);
        let touching: SmallVec<[usize; 2]> = self
            .by_key
            .get(key.as_ref())
            .map(|ids| {
                ids.iter()
                    .copied()
                    .filter(|&id| {
                        let s = self.session(id);
                        s.start <= end && s.end >= start
                    })
                    .collect()
            })
            .unwrap_or_default();
        for &id in &touching {
            let s = self.session(id);
            start = start.min(s.start);
            end = end.max(s.end);
        }
        if fired(end + self.lateness, watermark) {
            return Ok(None);
        }
        for &id in &touching {
            let s = self.sessions.get_mut(&id).expect("live session");
            if let Some(rows) = s.emitted.take() {
                s.recount(&mut self.held_bytes);
                self.retract.push(rows);
                self.dirty.insert(id);
            }
        }
        if let [only] = touching.as_slice() {
            let id = *only;
            let s = self.sessions.get_mut(&id).expect("live session");
            // A session only grows: its listed end stays a bound of its end.
            s.start = start;
            s.end = end;
            return Ok(Some(id));
        }
        let mut state = self.calls.new_one_group()?;
        let mut corrected = false;
        for id in touching {
            corrected |= self.dirty.remove(&id);
            let mut merged = self.remove(id);
            state.merge(&merged.state.freeze()?)?;
            merged_away.push(id);
        }
        let id = self.insert(Session::new(key.owned(), start, end, state));
        if corrected {
            self.dirty.insert(id);
        }
        Ok(Some(id))
    }

    /// The rows session `id` emits now, leaving its state as it was.
    fn rows_of(&mut self, id: usize) -> Result<RecordBatch> {
        let calls = self.calls.clone();
        let state = &mut self.sessions.get_mut(&id).expect("live session").state;
        let states = state.freeze()?;
        *state = calls.new_one_group()?;
        state.merge(&states)?;
        self.account(id);
        let mut copy = calls.new_one_group()?;
        copy.merge(&states)?;
        let session = &self.sessions[&id];
        let (key, start, end) = (session.key.clone(), session.start, session.end);
        let mut batches = Vec::new();
        self.emit(vec![Session::new(key, start, end, copy)], &mut batches)?;
        Ok(batches
            .pop()
            .map(|b| b.rows)
            .unwrap_or_else(|| RecordBatch::new_empty(self.schema.clone())))
    }

    /// The sessions, all of them or those of the keys whose sessions changed since the
    /// previous snapshot (every session of such a key, numbered with this snapshot).
    fn snapshot_of(&mut self, whole: bool) -> Result<Vec<RecordBatch>> {
        self.snapshots += 1;
        let changed = std::mem::take(&mut self.changed);
        let ids: Vec<usize> = if whole {
            self.sessions.keys().copied().collect()
        } else {
            let keys: HashSet<&OwnedRow> =
                changed.iter().map(|id| &self.sessions[id].key).collect();
            keys.into_iter()
                .flat_map(|key| self.by_key[key.as_ref()].iter().copied())
                .collect()
        };
        let mut out = vec![snapshot::progress(self.watermark, self.late)?];
        let mut rows = SessionRows::new(&self.converter, ids.len());
        let kept = self.calls.states_kept();
        for id in ids {
            let session = self.sessions.get_mut(&id).expect("live session");
            let states = session.state.state_values(&self.calls, &kept)?;
            session.recount(&mut self.held_bytes);
            if session.emitted.is_none() {
                rows.push(session.start, session.end, session.key.row(), states);
                continue;
            }
            let states = states
                .iter()
                .map(|call| call.iter().map(ScalarValue::to_array).collect())
                .collect::<Result<Vec<_>>>()?;
            let columns = partial_columns(&self.converter, &session.key, states)?;
            out.push(if whole {
                snapshot::batch("session", &[session.start, session.end], columns)?
            } else {
                snapshot::batch(
                    CHANGED_SESSION,
                    &[session.start, session.end, self.snapshots],
                    columns,
                )?
            });
            // A closed session kept for late rows: what it emitted, to retract then.
            if let Some(emitted) = &session.emitted {
                out.push(emitted_batch(emitted)?);
            }
        }
        if let Some(batch) = rows.batch(&self.converter, (!whole).then_some(self.snapshots))? {
            out.push(batch);
        }
        self.snapshotted_changes = changed;
        Ok(out)
    }

    fn emit(&mut self, sessions: Vec<Session>, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        // A row a session: its key, bounds and each call's value.
        let rows = sessions.len();
        let keys = self
            .converter
            .convert_rows(sessions.iter().map(|s| s.key.row()))?;
        let mut starts = Vec::with_capacity(rows);
        let mut ends = Vec::with_capacity(rows);
        let mut values: Vec<Vec<ScalarValue>> =
            vec![Vec::with_capacity(rows); self.calls.aggregates.len()];
        for s in sessions {
            starts.push(s.start);
            ends.push(s.end);
            let mut state = s.state;
            let session_values = state.evaluate()?;
            for (column, v) in values.iter_mut().zip(session_values) {
                column.push(v);
            }
        }
        let values = values
            .into_iter()
            .map(ScalarValue::iter_to_array)
            .collect::<Result<Vec<_>>>()?;
        let times: Vec<Millis> = ends.iter().map(|e| e - 1).collect();
        let columns = self
            .output
            .iter()
            .enumerate()
            .map(|(i, c)| -> Result<ArrayRef> {
                let array = match *c {
                    OutputColumn::WindowStart => millis_column(starts.clone(), &self.schema, i)?,
                    OutputColumn::WindowEnd => millis_column(ends.clone(), &self.schema, i)?,
                    OutputColumn::WindowTime => millis_column(times.clone(), &self.schema, i)?,
                    OutputColumn::Key(k) => keys[k].clone(),
                    OutputColumn::Aggregate(a) => values[a].clone(),
                };
                let ty = self.schema.field(i).data_type();
                Ok(if array.data_type() == ty {
                    array
                } else {
                    datafusion::arrow::compute::cast(&array, ty)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(ChangeBatch::new(crate::stream::batch_of(
            self.schema.clone(),
            columns,
            rows,
        )?));
        Ok(())
    }
}

impl Operator for SessionAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let times = to_millis(batch.rows.column(self.time_column))?;
        let key_columns = self.calls.key_columns(&batch.rows)?;
        let keys = self.converter.convert_columns(&key_columns)?;
        self.bring_back_keys_of(&keys)?;
        // Rows join sessions one by one; a session merged away later hands its rows on.
        let mut joined: Vec<(usize, u32)> = Vec::with_capacity(batch.num_rows());
        let mut moved: HashMap<usize, usize> = HashMap::default();
        let mut merged_away = Vec::new();
        let (mut late, mut late_watermarks) = (Vec::new(), Vec::new());
        for i in 0..batch.num_rows() {
            let watermark = batch.watermark_of(i, self.watermark);
            merged_away.clear();
            match self.assign(keys.row(i), times.value(i), watermark, &mut merged_away)? {
                Some(id) => {
                    for old in merged_away.drain(..) {
                        moved.insert(old, id);
                    }
                    joined.push((id, i as u32));
                }
                None => {
                    self.late += 1;
                    late.push(i as u32);
                    late_watermarks.push(watermark);
                }
            }
        }
        if let Some(sink) = &mut self.late_rows {
            sink.record("SessionAggregate", &batch.rows, late, late_watermarks)?;
        }
        let resolve = |mut id: usize| {
            while let Some(next) = moved.get(&id) {
                id = *next;
            }
            id
        };
        if !joined.is_empty() {
            // The batch's arguments put in session order once (rows of a session keep
            // theirs); each session folds in its range of them.
            for joined in &mut joined {
                joined.0 = resolve(joined.0);
            }
            joined.sort_by_key(|(id, _)| *id);
            let order = UInt32Array::from_iter_values(joined.iter().map(|(_, row)| *row));
            let inputs = self.calls.inputs(&batch.rows)?.take(&order)?;
            let mut offset = 0;
            for run in joined.chunk_by(|a, b| a.0 == b.0) {
                let id = run[0].0;
                self.fold_in(id, &inputs, offset, run.len())?;
                self.changed.insert(id);
                offset += run.len();
            }
        }
        for rows in std::mem::take(&mut self.retract) {
            out.push(ChangeBatch::with_op(rows, Op::UpdateBefore));
        }
        for id in std::mem::take(&mut self.dirty) {
            // A corrected session that is still closed emits again now; one that reopened
            // (its end moved past the watermark) emits when it closes.
            if self
                .sessions
                .get(&id)
                .is_some_and(|s| fired(s.end, self.watermark))
            {
                let rows = self.rows_of(id)?;
                out.push(ChangeBatch::with_op(rows.clone(), Op::UpdateAfter));
                self.set_emitted(id, rows);
            }
        }
        self.move_out_if_grown()
    }

    fn on_watermark(&mut self, watermark: Millis, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.watermark = watermark;
        self.bring_back_due(watermark)?;
        self.list_ends(0, watermark);
        let due: Vec<usize> = self
            .by_end
            .iter()
            .take_while(|(end, _)| fired(*end, watermark))
            .map(|(_, id)| *id)
            .filter(|id| self.sessions[id].emitted.is_none())
            .collect();
        if self.lateness == 0 {
            let closed: Vec<Session> = due.into_iter().map(|id| self.remove(id)).collect();
            return self.emit(closed, out);
        }
        for id in due {
            let rows = self.rows_of(id)?;
            out.push(ChangeBatch::new(rows.clone()));
            self.set_emitted(id, rows);
        }
        self.list_ends(self.lateness, watermark);
        let expired: Vec<usize> = self
            .by_end
            .iter()
            .take_while(|(end, _)| fired(*end + self.lateness, watermark))
            .map(|(_, id)| *id)
            .collect();
        for id in expired {
            self.remove(id);
        }
        Ok(())
    }

    fn state_size(&self) -> usize {
        self.spill.as_ref().map_or(0, Spill::bytes) + self.held_bytes
    }

    fn late_rows_dropped(&self) -> u64 {
        self.late
    }

    fn take_late_rows(&mut self) -> Vec<RecordBatch> {
        self.late_rows
            .as_mut()
            .map(LateRecorder::take)
            .unwrap_or_default()
    }

    fn snapshot(&mut self) -> Result<Vec<RecordBatch>> {
        self.snapshot_of(true)
    }

    fn snapshot_changes(&mut self) -> Result<Option<Vec<RecordBatch>>> {
        self.snapshot_of(false).map(Some)
    }

    fn snapshot_beyond_memory(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let changed = std::mem::take(&mut self.snapshotted_changes);
        self.spilled_snapshot(whole, &changed)
    }

    fn state_keys(&self, batch: &RecordBatch) -> Result<Option<Vec<ArrayRef>>> {
        let kind = snapshot::kind(batch)?;
        let heads = match kind.as_str() {
            "emitted" => {
                let (_, _, columns) = snapshot::parts(batch, 0)?;
                return Ok(Some(super::window_agg::output_keys(&self.output, &columns)));
            }
            CHANGED_SESSION | CHANGED_SESSIONS => 3,
            _ => 2,
        };
        let (_, _, columns) = snapshot::parts(batch, heads)?;
        Ok(Some(
            columns[..self.calls.key_schema.fields().len()].to_vec(),
        ))
    }

    fn restore(&mut self, state: Vec<RecordBatch>) -> Result<()> {
        let mut keys = Vec::new();
        for batch in &state {
            keys.extend(self.restored_keys(batch)?);
        }
        self.forget_replaced_on_disk(keys)?;
        for batch in state {
            self.restore_batch(batch)?;
            self.move_out_while_restoring()?;
        }
        Ok(())
    }

    /// The sessions of a whole snapshot and the changes after it that the restored
    /// watermark had closed (and, with a lateness, expired) go, as they went then.
    fn restored(&mut self) -> Result<()> {
        self.restored_from.clear();
        self.restored_last = None;
        // Keys that went to disk while restoring, with sessions that go now.
        self.bring_back_due(self.watermark)?;
        self.list_ends(self.lateness, self.watermark);
        let passed: Vec<usize> = self
            .by_end
            .iter()
            .take_while(|(end, _)| fired(*end + self.lateness, self.watermark))
            .map(|(_, id)| *id)
            .collect();
        for id in passed {
            self.remove(id);
        }
        // What the checkpoint holds counts as unchanged: beyond the budget, to disk.
        self.move_out(&HashSet::default())
    }
}

/// Sessions of a snapshot gathered into one batch, a session a row.
struct SessionRows {
    starts: Vec<Millis>,
    ends: Vec<Millis>,
    keys: Rows,
    /// Each state column of each call (in order), a value per session.
    states: Vec<Vec<ScalarValue>>,
}

impl SessionRows {
    fn new(converter: &RowConverter, sessions: usize) -> Self {
        SessionRows {
            starts: Vec::with_capacity(sessions),
            ends: Vec::with_capacity(sessions),
            keys: converter.empty_rows(sessions, sessions * 16),
            states: Vec::new(),
        }
    }

    /// Adds a session with `states`, each call's state values.
    fn push(&mut self, start: Millis, end: Millis, key: Row<'_>, states: Vec<Vec<ScalarValue>>) {
        self.starts.push(start);
        self.ends.push(end);
        self.keys.push(key);
        let values = states.into_iter().flatten();
        if self.states.is_empty() {
            self.states = values.map(|v| vec![v]).collect();
        } else {
            for (column, v) in self.states.iter_mut().zip(values) {
                column.push(v);
            }
        }
    }

    /// A `sessions` batch, or `sessions-changed` with the number of the snapshot of
    /// changes `changes`; `None` without sessions.
    fn batch(self, converter: &RowConverter, changes: Option<i64>) -> Result<Option<RecordBatch>> {
        let n = self.starts.len();
        if n == 0 {
            return Ok(None);
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.starts)),
            Arc::new(Int64Array::from(self.ends)),
        ];
        let kind = match changes {
            Some(number) => {
                columns.push(Arc::new(Int64Array::from(vec![number; n])));
                CHANGED_SESSIONS
            }
            None => SESSIONS,
        };
        columns.extend(converter.convert_rows(&self.keys)?);
        for values in self.states {
            columns.push(ScalarValue::iter_to_array(values)?);
        }
        snapshot::batch(kind, &[], columns).map(Some)
    }
}

/// The snapshot batch of a session's emitted rows.
fn emitted_batch(rows: &RecordBatch) -> Result<RecordBatch> {
    snapshot::batch("emitted", &[], rows.columns().to_vec())
}

/// A session's partial state as snapshot columns: its key's, then each call's state.
fn partial_columns(
    converter: &RowConverter,
    key: &OwnedRow,
    states: Vec<Vec<ArrayRef>>,
) -> Result<Vec<ArrayRef>> {
    let mut columns = converter.convert_rows(std::iter::once(key.row()))?;
    columns.extend(states.into_iter().flatten());
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    use super::*;
    use crate::stream::operator::testing::{restores_from_incremental_snapshots, run_step, Step};

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]))
    }

    /// SUM(v) per k over SESSION windows with a gap of 10.
    fn operator(lateness: Millis) -> SessionAggregate {
        let schema = input_schema();
        let sum = AggregateExprBuilder::new(sum_udaf(), vec![col("v", &schema).unwrap()])
            .schema(schema.clone())
            .alias("sum")
            .build()
            .unwrap();
        let calls = Arc::new(AggregateCalls {
            keys: vec![col("k", &schema).unwrap()],
            key_schema: Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)])),
            aggregates: vec![Arc::new(sum)],
            filters: vec![None],
        });
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let output = Arc::new(Schema::new(vec![
            Field::new("window_start", ts.clone(), false),
            Field::new("window_end", ts, false),
            Field::new("k", DataType::Int64, false),
            Field::new("sum", DataType::Int64, true),
        ]));
        let mut op = SessionAggregate::try_new(
            calls,
            10,
            2,
            vec![
                OutputColumn::WindowStart,
                OutputColumn::WindowEnd,
                OutputColumn::Key(0),
                OutputColumn::Aggregate(0),
            ],
            output,
        )
        .unwrap();
        op.lateness = lateness;
        op
    }

    fn rows(rows: &[(i64, i64, i64)]) -> ChangeBatch {
        ChangeBatch::new(
            RecordBatch::try_new(
                input_schema(),
                vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.2),
                    )),
                ],
            )
            .unwrap(),
        )
    }

    /// Sessions opening, merging (5 and 18 joined by 12), closing, and rows late for a
    /// closed session (within a lateness, or dropped).
    fn steps() -> Vec<Step> {
        vec![
            (rows(&[(1, 1, 5), (2, 2, 6), (1, 4, 18)]), 4),
            (rows(&[(1, 8, 12), (3, 1, 30)]), 10),
            (rows(&[(2, 3, 40), (3, 5, 33)]), 29),
            (rows(&[(1, 2, 20), (2, 7, 44)]), 45),
            (rows(&[(3, 6, 41), (4, 1, 60)]), 58),
            (rows(&[(4, 2, 65), (2, 1, 49)]), 200),
        ]
    }

    /// Under the sled backend with no memory for them, every snapshot moves every key's
    /// sessions out: rows of the key and the watermark closing its first session bring
    /// them back, whole snapshots read them from disk, and what closes or expires leaves
    /// the disk. Output and restores are those of the operator in memory.
    #[test]
    fn session_states_on_disk_give_the_same_sessions_and_restores() {
        use crate::stream::operator::testing::{backend_without_memory, snapshot_of};
        let (_dir, backend) = backend_without_memory();
        for lateness in [0, 20] {
            let fresh = || operator(lateness).with_backend(Some(&backend)).unwrap();
            let mut memory = operator(lateness);
            let mut disk = fresh();
            let mut went = 0;
            for (i, step) in disk_steps().iter().enumerate() {
                assert_eq!(run_step(&mut disk, step), run_step(&mut memory, step));
                assert_eq!(disk.held_bytes, recounted(&disk), "step {i}");
                assert_eq!(memory.held_bytes, recounted(&memory), "step {i}");
                // Whole and incremental snapshots alike hold what memory's would.
                let whole = i % 2 == 0;
                assert_eq!(
                    session_lines(&snapshot_of(&mut disk, whole)),
                    session_lines(&snapshot_of(&mut memory, whole)),
                    "step {i}"
                );
                let (keys, listed) = disk.spill.as_ref().expect("backend").counts();
                went += (keys > 0) as usize;
                assert_eq!(listed, keys, "step {i}: each key on disk listed once");
                assert_eq!(keys, memory.by_key.len(), "step {i}: every key went");
                assert!(
                    disk.sessions.is_empty() && disk.by_end.is_empty(),
                    "step {i}"
                );
                assert_eq!(disk.held_bytes, 0, "step {i}");
            }
            assert!(went >= 3, "state went to disk after {went} steps");
            assert_eq!(disk.spill.as_ref().unwrap().counts(), (0, 0), "all dropped");
            restores_from_incremental_snapshots(fresh, &disk_steps(), lateness > 0, |op| {
                (op.sessions.len(), op.spill.as_ref().unwrap().counts())
            });
        }
    }

    /// Sessions of many keys through the backend with no budget and with one that keeps
    /// some keys, rows out of order and late ones, with and without a lateness: the
    /// output after every step, every snapshot (whole and of changes) and a restore from
    /// any of them (moving keys out between its layers) are those of the operator in
    /// memory; and so when keys go out after every batch, changed ones included.
    #[test]
    fn sessions_of_many_keys_on_disk_behave_as_in_memory() {
        use crate::stream::operator::testing::snapshot_of;
        use crate::stream::state_backend::{EarlyEmitMark, SledBackend};
        use rand::rngs::SmallRng;
        use rand::{RngExt, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let configs = [
            (1, 0, 0, false),
            (2, 20, 0, false),
            (3, 0, 4000, false),
            (4, 20, 4000, false),
            (5, 0, 0, true),
            (6, 20, 4000, true),
        ];
        for (seed, lateness, budget, early) in configs {
            let backend = SledBackend {
                root: dir.path().to_path_buf(),
                memory: budget,
            };
            let mut rng = SmallRng::seed_from_u64(seed);
            let steps: Vec<Step> = (0..24)
                .map(|step| {
                    let base = 10 * step;
                    let batch: Vec<(i64, i64, i64)> = (0..30)
                        .map(|_| {
                            let t = (base + rng.random_range(-40..25)).max(0);
                            (rng.random_range(0..40), rng.random_range(1..9), t)
                        })
                        .collect();
                    (rows(&batch), base - 15)
                })
                .collect();
            // Restores move keys out as they go; `early`: so do batches.
            let fresh = || {
                let mut op = operator(lateness).with_backend(Some(&backend)).unwrap();
                let spill = op.spill.as_mut().unwrap();
                spill.restore_slack = 0;
                if early {
                    spill.early = EarlyEmitMark::with_slack(budget, 0);
                }
                op
            };
            let (mut memory, mut disk) = (operator(lateness), fresh());
            let (mut went, mut stayed, mut went_changed) = (false, false, false);
            for (i, step) in steps.iter().enumerate() {
                let case = format!("seed {seed} step {i}");
                assert_eq!(
                    run_step(&mut disk, step),
                    run_step(&mut memory, step),
                    "{case}"
                );
                assert_eq!(disk.held_bytes, recounted(&disk), "{case}");
                // Keys that went out with changes before the snapshot.
                went_changed |= disk.spill.as_ref().unwrap().changed_keys() > 0;
                let whole = i % 5 == 0;
                let taken = snapshot_of(&mut disk, whole);
                assert_eq!(
                    session_lines(&taken),
                    session_lines(&snapshot_of(&mut memory, whole)),
                    "{case}"
                );
                if whole {
                    // Restored a row at a time, keys going out between calls: a key's
                    // sessions of several calls end up in one place, as they were.
                    let mut restored = fresh();
                    for batch in &taken {
                        for row in 0..batch.num_rows() {
                            restored.restore(vec![batch.slice(row, 1)]).unwrap();
                        }
                    }
                    restored.restored().unwrap();
                    let spill = restored.spill.as_ref().unwrap();
                    for key in restored.by_key.keys() {
                        assert!(!spill.holds(key), "{case}: a key in memory and on disk");
                    }
                    let again = snapshot_of(&mut restored, true);
                    assert_eq!(session_lines(&again), session_lines(&taken), "{case}");
                }
                let (keys, listed) = disk.spill.as_ref().unwrap().counts();
                assert_eq!(listed, keys, "{case}");
                assert_eq!(keys + disk.by_key.len(), memory.by_key.len(), "{case}");
                assert!(disk.held_bytes <= budget, "{case}");
                went |= keys > 0;
                stayed |= !disk.by_key.is_empty();
            }
            assert!(went, "seed {seed}: keys went to disk");
            assert_eq!(went_changed, early, "seed {seed}: changed keys went early");
            assert_eq!(stayed, budget > 0, "seed {seed}: a budget keeps some");
            restores_from_incremental_snapshots(fresh, &steps, lateness > 0, |op| {
                let (keys, listed) = op.spill.as_ref().unwrap().counts();
                (op.by_key.len() + keys, listed == keys)
            });
        }
    }

    /// A snapshot's sessions, a line each whether a batch holds one or many, and its
    /// other batches, sorted.
    fn session_lines(batches: &[RecordBatch]) -> Vec<String> {
        let mut lines = Vec::new();
        for b in batches {
            let kind = match snapshot::kind(b).unwrap().as_str() {
                "session" | SESSIONS => "whole".to_string(),
                CHANGED_SESSION | CHANGED_SESSIONS => "changed".to_string(),
                other => other.to_string(),
            };
            for row in 0..b.num_rows() {
                let values: Vec<ArrayRef> = b.columns().iter().map(|c| c.slice(row, 1)).collect();
                lines.push(format!("{kind} {values:?}"));
            }
        }
        lines.sort();
        lines
    }

    /// For states on disk: key 1's second session comes while its first is on disk (an
    /// incremental snapshot of key 1 reads that one back), and closed sessions kept for a
    /// lateness are on disk with their emitted rows at a whole snapshot, then one is
    /// corrected by a late row.
    fn disk_steps() -> Vec<Step> {
        vec![
            (rows(&[(1, 1, 5), (2, 2, 6)]), 4),
            (rows(&[(1, 2, 40), (3, 1, 20)]), 18),
            (rows(&[(4, 1, 25)]), 22),
            (rows(&[(1, 5, 10)]), 30),
            (rows(&[(5, 1, 100)]), 200),
        ]
    }

    #[test]
    fn incremental_snapshots_restore_what_a_whole_one_would() {
        for lateness in [0, 20] {
            restores_from_incremental_snapshots(
                || operator(lateness),
                &steps(),
                lateness > 0,
                |op| (op.sessions.len(), op.held_bytes == recounted(op)),
            );
        }
    }

    /// The memory of the sessions, summed anew.
    fn recounted(op: &SessionAggregate) -> usize {
        op.sessions
            .values()
            .map(|s| {
                let emitted = s.emitted.as_ref().map_or(0, |e| e.get_array_memory_size());
                SESSION_BYTES + s.state.size() + s.key.as_ref().len() + emitted
            })
            .sum()
    }

    /// A row extends a session past a watermark that passed the end it had when the
    /// index listed it: the session stays open, closes at its new end, and the memory
    /// counted for the sessions follows them in and out.
    #[test]
    fn extended_sessions_close_at_their_new_end() {
        let mut op = operator(0);
        assert!(run_step(&mut op, &(rows(&[(1, 1, 0), (2, 5, 3)]), 2)).is_empty());
        assert!(op.held_bytes > 0);
        assert_eq!(op.held_bytes, recounted(&op));
        // Key 1's session [0, 10) grows to [0, 18); the watermark passes 10, then 16.
        assert_eq!(
            run_step(&mut op, &(rows(&[(1, 2, 8)]), 12)),
            ["+I 1970-01-01T00:00:00.003,1970-01-01T00:00:00.013,2,5"]
        );
        assert_eq!(op.held_bytes, recounted(&op));
        assert!(run_step(&mut op, &(rows(&[]), 16)).is_empty());
        assert_eq!(
            run_step(&mut op, &(rows(&[]), 17)),
            ["+I 1970-01-01T00:00:00,1970-01-01T00:00:00.018,1,3"]
        );
        assert_eq!(
            (op.sessions.len(), op.held_bytes, op.by_end.len()),
            (0, 0, 0)
        );
    }
}
