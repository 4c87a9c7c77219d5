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
//! key on disk; both read off the task, the keys as they were at the snapshot
//! ([`super::record`] says how a key's record is laid out). Restores write to disk as
//! they go ([`super::restore`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array};
use datafusion::common::{HashSet, Result, ScalarValue};

use super::record::{snapshot_reader, Codec, Decoded, StoredSession};
use super::{Session, SessionAggregate};
use crate::stream::message::Millis;
use crate::stream::operator::StateReader;
use crate::stream::state_backend::files::RunFiles;
use crate::stream::state_backend::runs::RunStore;
use crate::stream::state_backend::{EarlyEmitMark, SledBackend, EARLY_EMIT_SLACK};
use crate::stream::window::fired;

pub(super) struct Spill {
    /// Key -> its sessions ([`Codec::record`]).
    pub(super) store: RunStore,
    /// Bytes of sessions kept in memory.
    pub(super) memory: usize,
    /// How far a restore lets the sessions in memory outgrow the budget before moving
    /// keys out ([`EARLY_EMIT_SLACK`]; tests make it 0).
    pub(super) restore_slack: usize,
    /// (when the key is due, its hash) of every key on disk -> how many keys: the
    /// watermark that passes the first brings the second's keys back.
    due: BTreeMap<(Millis, u64), u32>,
    pub(super) codec: Arc<Codec>,
    /// Keys moved to disk between snapshots with sessions changed since the previous
    /// one: the next snapshot of changes reads them there.
    changed: HashSet<Vec<u8>>,
    /// When keys go out between snapshots.
    pub(super) early: EarlyEmitMark,
}

impl Spill {
    pub(super) fn bytes(&self) -> usize {
        self.store.bytes()
    }

    /// Writes keys' records ((due, key, record)), listing each key under its due
    /// place; they go out in that order, so that one watermark's keys share runs.
    pub(super) fn write(&mut self, mut records: Vec<(Millis, &[u8], Vec<u8>)>) -> Result<()> {
        records.sort_unstable_by_key(|(due, _, _)| *due);
        for (due, key, _) in &records {
            let hash = self.store.hash_of(key);
            self.list(*due, hash);
        }
        self.store.put_all(
            records
                .iter()
                .map(|(_, key, record)| (*key, record.as_slice())),
        )
    }

    fn list(&mut self, due: Millis, hash: u64) {
        *self.due.entry((due, hash)).or_default() += 1;
    }

    pub(super) fn unlist(&mut self, due: Millis, hash: u64) {
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

    /// Puts the sessions of records taken off disk back into memory, marked changed
    /// as they were when they went (while no snapshot of changes has read them since).
    pub(super) fn put_back(&mut self, found: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
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
    pub(super) fn move_out_but(
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
        spill.changed.extend(dirty);
        spill.write(records)
    }
}
