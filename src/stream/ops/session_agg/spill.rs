//! A session aggregate's sessions under the sled state backend. After each snapshot the
//! keys whose sessions take memory beyond the budget go to disk whole: every session of
//! the key (bounds, partial state, emitted rows) in one record of a [`RunStore`] under
//! the key. First keys no row changed since the snapshot before go, then the others,
//! each group those whose sessions end last first. What stays in memory of a key on
//! disk is its index entry and its place on the due list: the watermark at which its
//! first session closes (or, kept for an allowed lateness, expires), with the key's
//! hash. A row of the key, or the watermark reaching that place, brings all the key's
//! sessions back, so a key is either in memory or on disk, never split. Keys go out in
//! the order of those places, so that the keys one watermark closes come back from few
//! runs.
//!
//! When the sessions in memory outgrow what stayed at the previous move by 32 MiB
//! between snapshots ([`EarlyEmitMark`]), keys go out then too, changed ones included:
//! those are listed, and the next snapshot of changes reads them from disk (a key that
//! comes back before then is marked changed again instead). A whole snapshot reads every
//! key on disk; both read off the task, the keys as they were at the snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{DataFusionError, HashSet, Result, ScalarValue};

use super::{Session, SessionAggregate, CHANGED_SESSION, CHANGED_SESSIONS, SESSIONS};
use crate::stream::message::Millis;
use crate::stream::operator::StateReader;
use crate::stream::ops::grouped::{AggregateCalls, Partial};
use crate::stream::snapshot;
use crate::stream::state_backend::files::RunFiles;
use crate::stream::state_backend::runs::FrozenEntries;
use crate::stream::state_backend::runs::RunStore;
use crate::stream::state_backend::{EarlyEmitMark, SledBackend, EARLY_EMIT_SLACK};
use crate::stream::window::fired;

/// Sessions per `sessions` batch of a snapshot's part on disk.
const SNAPSHOT_SESSIONS: usize = 8192;

pub(super) struct Spill {
    /// Key -> its sessions ([`Codec::record`]).
    store: RunStore,
    /// Bytes of sessions kept in memory.
    pub(super) memory: usize,
    /// How far a restore lets the sessions in memory outgrow the budget before moving
    /// keys out ([`EARLY_EMIT_SLACK`]; tests make it 0).
    pub(super) restore_slack: usize,
    /// (when the key is due, its hash) of every key on disk -> how many keys: the
    /// watermark that passes the first brings the second's keys back.
    due: BTreeMap<(Millis, u64), u32>,
    codec: Arc<Codec>,
    /// Keys moved to disk between snapshots with sessions changed since the previous
    /// one: the next snapshot of changes reads them there.
    changed: HashSet<Vec<u8>>,
    /// When keys go out between snapshots.
    pub(super) early: EarlyEmitMark,
}

/// How a key's sessions are written on disk: the place on the due list, then per session
/// whether it changed since the previous snapshot (a byte), its row (start, end, each
/// call's state columns) and its emitted row, if any, each behind its length.
pub(super) struct Codec {
    keys: RowConverter,
    sessions: RowConverter,
    emitted: RowConverter,
    output: SchemaRef,
    /// The state columns of each call, in order.
    state_types: Vec<Vec<DataType>>,
}

/// Session rows decoded, a session an element: bounds and each call's state columns.
struct Decoded {
    starts: Vec<Millis>,
    ends: Vec<Millis>,
    states: Vec<Vec<ArrayRef>>,
}

/// A key's record read back: its place on the due list and its sessions.
struct Record<'a> {
    due: Millis,
    sessions: Vec<StoredSession<'a>>,
}

/// A session as a key's record holds it.
struct StoredSession<'a> {
    changed: bool,
    row: &'a [u8],
    emitted: Option<&'a [u8]>,
}

impl Codec {
    fn new(calls: &AggregateCalls, output: SchemaRef) -> Result<Option<Self>> {
        let keys: Vec<SortField> = calls
            .key_schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let state_types: Vec<Vec<DataType>> = calls
            .aggregates
            .iter()
            .map(|a| {
                let fields = a.state_fields()?;
                Ok(fields.iter().map(|f| f.data_type().clone()).collect())
            })
            .collect::<Result<_>>()?;
        let mut sessions = vec![
            SortField::new(DataType::Int64),
            SortField::new(DataType::Int64),
        ];
        sessions.extend(state_types.iter().flatten().cloned().map(SortField::new));
        let emitted: Vec<SortField> = output
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let supported = [&keys, &sessions, &emitted]
            .iter()
            .all(|fields| RowConverter::supports_fields(fields));
        if !supported {
            return Ok(None);
        }
        Ok(Some(Codec {
            keys: RowConverter::new(keys)?,
            sessions: RowConverter::new(sessions)?,
            emitted: RowConverter::new(emitted)?,
            output,
            state_types,
        }))
    }

    /// A key's record: `due`, then each session's row and emitted row.
    fn record<'a>(due: Millis, sessions: impl Iterator<Item = StoredSession<'a>>) -> Vec<u8> {
        let mut out = due.to_le_bytes().to_vec();
        for session in sessions {
            out.push(session.changed as u8);
            for part in [session.row, session.emitted.unwrap_or_default()] {
                out.extend_from_slice(&(part.len() as u32).to_le_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    fn parse(record: &[u8]) -> Result<Record<'_>> {
        let corrupt = || DataFusionError::Internal("a session record on disk is cut short".into());
        let bytes = |from: usize, len: usize| record.get(from..from + len).ok_or_else(corrupt);
        let due = Millis::from_le_bytes(bytes(0, 8)?.try_into().expect("8 bytes"));
        let mut at = 8;
        let part = |at: &mut usize| -> Result<&[u8]> {
            let len = u32::from_le_bytes(bytes(*at, 4)?.try_into().expect("4 bytes")) as usize;
            let part = bytes(*at + 4, len)?;
            *at += 4 + len;
            Ok(part)
        };
        let mut sessions = Vec::new();
        while at < record.len() {
            let changed = bytes(at, 1)?[0] != 0;
            at += 1;
            let row = part(&mut at)?;
            // An emitted row is never empty: it has the output's columns.
            let emitted = Some(part(&mut at)?).filter(|e| !e.is_empty());
            sessions.push(StoredSession {
                changed,
                row,
                emitted,
            });
        }
        Ok(Record { due, sessions })
    }

    fn decode_sessions<'a>(&self, rows: impl IntoIterator<Item = &'a [u8]>) -> Result<Decoded> {
        let parser = self.sessions.parser();
        let columns = self
            .sessions
            .convert_rows(rows.into_iter().map(|r| parser.parse(r)))?;
        let bound = |c: &ArrayRef| c.as_primitive::<Int64Type>().values().to_vec();
        let (starts, ends) = (bound(&columns[0]), bound(&columns[1]));
        let mut states = Vec::with_capacity(self.state_types.len());
        let mut at = 2;
        for types in &self.state_types {
            states.push(columns[at..at + types.len()].to_vec());
            at += types.len();
        }
        Ok(Decoded {
            starts,
            ends,
            states,
        })
    }

    /// A batch of emitted rows decoded.
    fn decode_emitted(&self, rows: &[&[u8]]) -> Result<RecordBatch> {
        let parser = self.emitted.parser();
        let columns = self
            .emitted
            .convert_rows(rows.iter().map(|r| parser.parse(r)))?;
        crate::stream::batch_of(self.output.clone(), columns, rows.len())
    }

    fn decode_keys(&self, keys: &[&[u8]]) -> Result<Vec<ArrayRef>> {
        let parser = self.keys.parser();
        Ok(self
            .keys
            .convert_rows(keys.iter().map(|k| parser.parse(k)))?)
    }
}

impl Spill {
    pub(super) fn bytes(&self) -> usize {
        self.store.bytes()
    }

    fn list(&mut self, due: Millis, hash: u64) {
        *self.due.entry((due, hash)).or_default() += 1;
    }

    fn unlist(&mut self, due: Millis, hash: u64) {
        if let Some(n) = self.due.get_mut(&(due, hash)) {
            *n -= 1;
            if *n == 0 {
                self.due.remove(&(due, hash));
            }
        }
    }

    /// How many keys went to disk with changes the next snapshot of changes reads.
    #[cfg(test)]
    pub(super) fn changed_keys(&self) -> usize {
        self.changed.len()
    }

    /// Whether `key` (encoded) has sessions on disk.
    #[cfg(test)]
    pub(super) fn holds(&self, key: &[u8]) -> bool {
        let mut found = false;
        self.store
            .read(&[key], &mut |_, _| {
                found = true;
                Ok(())
            })
            .unwrap();
        found
    }

    /// How many keys are on disk, and how many places the due list holds.
    #[cfg(test)]
    pub(super) fn counts(&self) -> (usize, usize) {
        (
            self.store.len(),
            self.due.values().map(|n| *n as usize).sum(),
        )
    }
}

impl SessionAggregate {
    /// Keeps sessions beyond `backend`'s memory budget on disk, when arrow's row format
    /// encodes the key, the partial states and the output (else all stay in memory).
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        let Some(backend) = backend else {
            return Ok(self);
        };
        let Some(codec) = Codec::new(&self.calls, self.schema.clone())? else {
            return Ok(self);
        };
        self.spill = Some(Spill {
            store: RunStore::new(RunFiles::new(backend.scratch_dir()?)),
            memory: backend.memory,
            restore_slack: EARLY_EMIT_SLACK,
            due: BTreeMap::new(),
            codec: Arc::new(codec),
            changed: HashSet::default(),
            early: EarlyEmitMark::new(backend.memory),
        });
        Ok(self)
    }

    /// Whether the backend can keep its sessions on disk ([`SessionAggregate::with_backend`]).
    pub fn can_spill(&self) -> Result<bool> {
        Ok(Codec::new(&self.calls, self.schema.clone())?.is_some())
    }

    /// Brings the sessions on disk of `keys` (encoded) back into memory.
    pub(super) fn bring_back(&mut self, keys: &[&[u8]]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        if spill.store.is_empty() {
            return Ok(());
        }
        let found: Vec<(Vec<u8>, Vec<u8>)> = spill
            .store
            .take_all(keys)?
            .into_iter()
            .map(|(i, record)| (keys[i].to_vec(), record))
            .collect();
        self.put_back(found)
    }

    /// Forgets what `key` (encoded) has on disk: a later snapshot replaces its sessions.
    pub(super) fn forget_on_disk(&mut self, key: &[u8]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        if let Some(record) = spill.store.take(key)? {
            let due = Codec::parse(&record)?.due;
            spill.unlist(due, spill.store.hash_of(key));
        }
        Ok(())
    }

    /// Before restoring a call's batches: sessions of their keys (each with the number
    /// of the snapshot of changes it came from, if any) that went to disk meanwhile come
    /// back, or are forgotten when a later snapshot replaces them, all at once so that
    /// each run is read once (keys of a layer are spread over every run: a take per batch
    /// of 8192 read nearly all runs each time).
    pub(super) fn settle_restored_keys(&mut self, keys: Vec<(Vec<u8>, Option<i64>)>) -> Result<()> {
        if self.spill.as_ref().is_none_or(|s| s.bytes() == 0) {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let mut absent: Vec<&[u8]> = Vec::new();
        let mut replaced: Vec<bool> = Vec::new();
        for (key, from) in &keys {
            if self.by_key.contains_key(key.as_slice()) || !seen.insert(key) {
                continue;
            }
            absent.push(key);
            replaced
                .push(from.is_some() && self.restored_from.get(key.as_slice()) != from.as_ref());
        }
        let spill = self.spill.as_mut().expect("checked");
        let mut back = Vec::new();
        for (i, record) in spill.store.take_all(&absent)? {
            if replaced[i] {
                let due = Codec::parse(&record)?.due;
                spill.unlist(due, spill.store.hash_of(absent[i]));
            } else {
                back.push((absent[i].to_vec(), record));
            }
        }
        self.put_back(back)
    }

    /// Restores a batch of many sessions (`columns`: start, end, the number of the
    /// snapshot of changes when `heads` is 3, the key's columns, each call's state
    /// columns) under the backend, without building them in memory: sessions of keys in
    /// memory join them ([`SessionAggregate::restore_session`]); the others are written
    /// to disk as they are, a record per key, after the sessions this restore already
    /// wrote of the key unless the batch's snapshot replaces those. `false`: without the
    /// backend, nothing done.
    pub(super) fn restore_sessions_to_disk(
        &mut self,
        columns: &[ArrayRef],
        heads: usize,
    ) -> Result<bool> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(false);
        };
        let codec = spill.codec.clone();
        let starts: &Int64Array = snapshot::column(columns, 0)?;
        let ends: &Int64Array = snapshot::column(columns, 1)?;
        let from = match heads {
            3 => Some(snapshot::column::<Int64Array>(columns, 2)?),
            _ => None,
        };
        let key_count = self.calls.key_schema.fields().len();
        let keys = self
            .converter
            .convert_columns(&columns[heads..heads + key_count])?;
        // Each key's rows, keys in the order they come.
        let mut order: Vec<&[u8]> = Vec::new();
        let mut rows_of: datafusion::common::HashMap<&[u8], Vec<usize>> = Default::default();
        let mut in_memory = Vec::new();
        for row in 0..starts.len() {
            let key = keys.row(row).data();
            if self.by_key.contains_key(key) {
                in_memory.push(row);
                continue;
            }
            rows_of
                .entry(key)
                .or_insert_with(|| {
                    order.push(key);
                    Vec::new()
                })
                .push(row);
        }
        if !in_memory.is_empty() {
            let partials = Partial::from_columns(&self.calls, &columns[heads..])?;
            for row in in_memory {
                let bounds = (starts.value(row), ends.value(row));
                let from = from.map(|f| f.value(row));
                let key = keys.row(row).owned();
                self.restore_session(bounds, from, key, &partials.slice(row))?;
            }
        }
        if order.is_empty() {
            return Ok(true);
        }
        // A snapshot of changes replaces what earlier ones held of a key.
        let replaced: Vec<bool> = order
            .iter()
            .map(|key| {
                let from = from.map(|f| f.value(rows_of[key][0]));
                let replaces = from.is_some() && self.restored_from.get(*key) != from.as_ref();
                if let (true, Some(from)) = (replaces, from) {
                    self.restored_from.insert((*key).into(), from);
                }
                replaces
            })
            .collect();
        let mut session_columns = vec![columns[0].clone(), columns[1].clone()];
        let states = &columns[heads + key_count..];
        for (column, ty) in states.iter().zip(codec.state_types.iter().flatten()) {
            session_columns.push(if column.data_type() == ty {
                column.clone()
            } else {
                datafusion::arrow::compute::cast(column, ty)?
            });
        }
        let rows = codec.sessions.convert_columns(&session_columns)?;
        let spill = self.spill.as_mut().expect("checked");
        let mut earlier: Vec<Option<Vec<u8>>> = vec![None; order.len()];
        for (i, record) in spill.store.take_all(&order)? {
            let due = Codec::parse(&record)?.due;
            spill.unlist(due, spill.store.hash_of(order[i]));
            if !replaced[i] {
                earlier[i] = Some(record);
            }
        }
        let mut records: Vec<(Millis, &[u8], Vec<u8>)> = Vec::with_capacity(order.len());
        for (key, earlier) in order.iter().zip(&earlier) {
            let earlier = earlier.as_deref().map(Codec::parse).transpose()?;
            let new = rows_of[key].iter().map(|&row| StoredSession {
                changed: false,
                row: rows.row(row).data(),
                emitted: None,
            });
            let due = rows_of[key].iter().map(|&row| ends.value(row));
            let due = due
                .chain(earlier.as_ref().map(|r| r.due))
                .min()
                .expect("a row");
            let sessions = earlier.into_iter().flat_map(|r| r.sessions).chain(new);
            records.push((due, key, Codec::record(due, sessions)));
        }
        records.sort_unstable_by_key(|(due, _, _)| *due);
        for (due, key, _) in &records {
            let hash = spill.store.hash_of(key);
            spill.list(*due, hash);
        }
        spill.store.put_all(
            records
                .iter()
                .map(|(_, key, record)| (*key, record.as_slice())),
        )?;
        Ok(true)
    }

    /// While restoring: once the sessions in memory outgrow the budget by
    /// [`EARLY_EMIT_SLACK`], keys go to disk as after a snapshot, so that a restore does
    /// not hold all of them. The key of the session restored last stays: its emitted
    /// rows may come in the next batch.
    pub(super) fn move_out_while_restoring(&mut self) -> Result<()> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(());
        };
        if self.held_bytes <= spill.memory.saturating_add(spill.restore_slack) {
            return Ok(());
        }
        let last = self.restored_last.and_then(|id| self.sessions.get(&id));
        let keep = last.map(|s| s.key.as_ref().to_vec());
        self.move_out_but(Some(&HashSet::default()), keep.as_deref())
    }

    /// Brings back the keys on disk whose first session `watermark` closes or expires.
    pub(super) fn bring_back_due(&mut self, watermark: Millis) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        let hashes: Vec<u64> = spill
            .due
            .keys()
            .take_while(|(due, _)| fired(*due, watermark))
            .map(|(_, hash)| *hash)
            .collect();
        if hashes.is_empty() {
            return Ok(());
        }
        let found = spill.store.take_hashed(&hashes)?;
        self.put_back(found)
    }

    /// Puts the sessions of records taken off disk back into memory, unchanged.
    fn put_back(&mut self, found: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        if found.is_empty() {
            return Ok(());
        }
        let spill = self.spill.as_mut().expect("taken from disk");
        let codec = spill.codec.clone();
        let mut owners = Vec::new();
        let mut rows = Vec::new();
        let mut emitted = Vec::new();
        let mut changed = Vec::new();
        for (k, (key, record)) in found.iter().enumerate() {
            let record = Codec::parse(record)?;
            spill.unlist(record.due, spill.store.hash_of(key));
            // Its sessions' marks count until a snapshot of changes read the key.
            let unsnapshotted = spill.changed.remove(key);
            for session in record.sessions {
                owners.push(k);
                rows.push(session.row);
                emitted.push(session.emitted);
                changed.push(unsnapshotted && session.changed);
            }
        }
        let Decoded {
            starts,
            ends,
            states,
        } = codec.decode_sessions(rows)?;
        let key_parser = self.converter.parser();
        for (i, k) in owners.into_iter().enumerate() {
            let mut state = self.calls.new_one_group()?;
            let one: Vec<Vec<ArrayRef>> = states
                .iter()
                .map(|call| call.iter().map(|c| c.slice(i, 1)).collect())
                .collect();
            state.merge(&one)?;
            let key = key_parser.parse(&found[k].0).owned();
            let mut session = Session::new(key, starts[i], ends[i], state);
            if let Some(row) = emitted[i] {
                session.emitted = Some(codec.decode_emitted(&[row])?);
            }
            let id = self.insert(session);
            // Changed since the previous snapshot as it was when it went out.
            if !changed[i] {
                self.changed.remove(&id);
            }
        }
        Ok(())
    }

    /// After a snapshot: what is on disk as it is now, for a whole one (read later, off
    /// the task); then keys whose sessions are beyond the budget go to disk. `changed`:
    /// the sessions rows changed since the snapshot before.
    pub(super) fn spilled_snapshot(
        &mut self,
        whole: bool,
        changed: &HashSet<usize>,
    ) -> Result<Option<StateReader>> {
        let number = self.snapshots;
        let Some(spill) = self.spill.as_mut() else {
            return Ok(None);
        };
        let keys = (!whole).then(|| spill.changed.drain().collect::<Vec<_>>());
        spill.changed.clear();
        let reader = if keys.as_ref().is_some_and(Vec::is_empty) || spill.store.is_empty() {
            None
        } else {
            let entries = spill.store.freeze(keys)?;
            let changes = (!whole).then_some(number);
            Some(snapshot_reader(entries, spill.codec.clone(), changes))
        };
        self.move_out(changed)?;
        self.early_moved();
        Ok(reader)
    }

    /// After a batch: when the sessions in memory outgrew what stayed at the previous
    /// move by the slack, keys go to disk as after a snapshot.
    pub(super) fn move_out_if_grown(&mut self) -> Result<()> {
        let Some(spill) = self.spill.as_ref() else {
            return Ok(());
        };
        if !spill.early.is_passed(self.held_bytes) {
            return Ok(());
        }
        self.move_out_but(None, None)?;
        self.early_moved();
        Ok(())
    }

    fn early_moved(&mut self) {
        let stayed = self.held_bytes;
        if let Some(spill) = self.spill.as_mut() {
            spill.early.moved(stayed);
        }
    }

    /// Moves keys' sessions to disk until those in memory fit the budget: keys without
    /// sessions in `changed` first, then the others, those whose sessions end last first.
    pub(super) fn move_out(&mut self, changed: &HashSet<usize>) -> Result<()> {
        self.move_out_but(Some(changed), None)
    }

    /// [`SessionAggregate::move_out`], `keep` (an encoded key) staying in memory;
    /// `changed` `None`: the sessions changed since the previous snapshot.
    fn move_out_but(
        &mut self,
        changed: Option<&HashSet<usize>>,
        keep: Option<&[u8]>,
    ) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        let mut held = self.held_bytes;
        if held <= memory {
            return Ok(());
        }
        // (changed, -last end, bytes, key) of every key.
        let mut order: Vec<(bool, Millis, usize, &[u8])> = self
            .by_key
            .iter()
            .filter(|(key, _)| keep != Some(key.as_ref()))
            .map(|(key, ids)| {
                let sessions = ids.iter().map(|id| &self.sessions[id]);
                let (mut change, mut last, mut bytes) = (false, Millis::MIN, 0);
                for (id, s) in ids.iter().zip(sessions) {
                    change |= changed.unwrap_or(&self.changed).contains(id);
                    last = last.max(s.end);
                    bytes += s.accounted;
                }
                (change, -last, bytes, key.as_ref())
            })
            .collect();
        order.sort_unstable_by_key(|(change, last, _, _)| (*change, *last));
        let mut going = Vec::new();
        for (_, _, bytes, key) in order {
            if held <= memory {
                break;
            }
            held -= bytes;
            going.push(key.to_vec());
        }
        self.write_out(going)
    }

    /// Writes every session of `keys` to disk and forgets them in memory.
    fn write_out(&mut self, keys: Vec<Vec<u8>>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let lateness = self.lateness;
        let kept = self.calls.states_kept();
        let mut sessions: Vec<Session> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let mut dues: Vec<Millis> = Vec::with_capacity(keys.len());
        let mut changed: Vec<bool> = Vec::new();
        let mut dirty = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            let ids = self.by_key.get(key.as_slice()).cloned().unwrap_or_default();
            if ids.iter().any(|id| self.changed.contains(id)) {
                dirty.push(key.clone());
            }
            let mut due = Millis::MAX;
            for id in ids {
                changed.push(self.changed.contains(&id));
                let session = self.remove(id);
                due = due.min(match session.emitted {
                    Some(_) => session.end + lateness,
                    None => session.end,
                });
                sessions.push(session);
                owners.push(k);
            }
            dues.push(due);
        }
        // Columns start, end and each call's state columns, a session a row.
        let spill = self.spill.as_mut().expect("moving needs the backend");
        let codec = spill.codec.clone();
        let mut starts = Vec::with_capacity(sessions.len());
        let mut ends = Vec::with_capacity(sessions.len());
        let mut values: Vec<Vec<ScalarValue>> =
            vec![Vec::with_capacity(sessions.len()); codec.state_types.iter().flatten().count()];
        let mut emitted_rows: Vec<Option<Vec<u8>>> = Vec::with_capacity(sessions.len());
        for session in &mut sessions {
            starts.push(session.start);
            ends.push(session.end);
            let states = session.state.state_values(&self.calls, &kept)?;
            for (column, v) in values.iter_mut().zip(states.into_iter().flatten()) {
                column.push(v);
            }
            emitted_rows.push(match &session.emitted {
                Some(rows) => {
                    let encoded = codec.emitted.convert_columns(rows.columns())?;
                    Some(encoded.row(0).data().to_vec())
                }
                None => None,
            });
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(starts)),
            Arc::new(Int64Array::from(ends)),
        ];
        for (column, ty) in values.into_iter().zip(codec.state_types.iter().flatten()) {
            let array = ScalarValue::iter_to_array(column)?;
            columns.push(if array.data_type() == ty {
                array
            } else {
                datafusion::arrow::compute::cast(&array, ty)?
            });
        }
        let rows = codec.sessions.convert_columns(&columns)?;
        // A record per key, written in the order they fall due.
        let mut records: Vec<(Millis, &[u8], Vec<u8>)> = Vec::with_capacity(keys.len());
        let mut at = 0;
        for (k, key) in keys.iter().enumerate() {
            let from = at;
            while at < owners.len() && owners[at] == k {
                at += 1;
            }
            let parts = (from..at).map(|i| StoredSession {
                changed: changed[i],
                row: rows.row(i).data(),
                emitted: emitted_rows[i].as_deref(),
            });
            records.push((dues[k], key.as_slice(), Codec::record(dues[k], parts)));
        }
        records.sort_unstable_by_key(|(due, _, _)| *due);
        spill.changed.extend(dirty);
        for (due, key, _) in &records {
            let hash = spill.store.hash_of(key);
            spill.list(*due, hash);
        }
        spill.store.put_all(
            records
                .iter()
                .map(|(_, key, record)| (*key, record.as_slice())),
        )
    }
}

/// Sessions on disk as they are now (`entries`), read later off the task into the batches
/// an in-memory snapshot holds: of a whole snapshot, or of the snapshot of changes
/// numbered `changes`. Sessions kept for an allowed lateness each get a batch of their own
/// followed by their emitted rows.
fn snapshot_reader(entries: FrozenEntries, codec: Arc<Codec>, changes: Option<i64>) -> StateReader {
    Box::new(move |out| {
        // Sessions without emitted rows, gathered: (key, session row).
        let mut plain: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let flush = |plain: &mut Vec<(Vec<u8>, Vec<u8>)>,
                     out: &mut dyn FnMut(RecordBatch) -> Result<()>|
         -> Result<()> {
            let keys: Vec<&[u8]> = plain.iter().map(|(k, _)| k.as_slice()).collect();
            let rows = plain.iter().map(|(_, r)| r.as_slice());
            let Decoded {
                starts,
                ends,
                states,
            } = codec.decode_sessions(rows)?;
            let n = starts.len();
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(starts)),
                Arc::new(Int64Array::from(ends)),
            ];
            let kind = match changes {
                Some(number) => {
                    columns.push(Arc::new(Int64Array::from(vec![number; n])));
                    CHANGED_SESSIONS
                }
                None => SESSIONS,
            };
            columns.extend(codec.decode_keys(&keys)?);
            columns.extend(states.into_iter().flatten());
            plain.clear();
            out(snapshot::batch(kind, &[], columns)?)
        };
        entries.for_each(&mut |key, record| {
            let record = Codec::parse(record)?;
            for StoredSession { row, emitted, .. } in record.sessions {
                let Some(emitted) = emitted else {
                    plain.push((key.to_vec(), row.to_vec()));
                    if plain.len() == SNAPSHOT_SESSIONS {
                        flush(&mut plain, out)?;
                    }
                    continue;
                };
                let one = codec.decode_sessions([row])?;
                let mut columns = codec.decode_keys(&[key])?;
                columns.extend(one.states.into_iter().flatten());
                let (start, end) = (one.starts[0], one.ends[0]);
                out(match changes {
                    Some(number) => {
                        snapshot::batch(CHANGED_SESSION, &[start, end, number], columns)?
                    }
                    None => snapshot::batch("session", &[start, end], columns)?,
                })?;
                let rows = codec.decode_emitted(&[emitted])?;
                out(super::emitted_batch(&rows)?)?;
            }
            Ok(())
        })?;
        if !plain.is_empty() {
            flush(&mut plain, out)?;
        }
        Ok(())
    })
}
