//! Restoring a session aggregate under the sled backend: a snapshot's batches of many
//! sessions go straight to disk, a record per key (building each session in memory and
//! moving it out again was most of a restart); what does come into memory (sessions
//! kept for a lateness, with their emitted rows) moves out as the restore goes.

use datafusion::arrow::array::{ArrayRef, Int64Array};
use datafusion::common::{HashMap, HashSet, Result};

use super::record::{Codec, StoredSession};
use super::SessionAggregate;
use crate::stream::message::Millis;
use crate::stream::ops::grouped::Partial;
use crate::stream::snapshot;

impl SessionAggregate {
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

    /// Before restoring a call's batches: keys on disk that a later snapshot of changes
    /// among them replaces (`keys`: each with the number of the snapshot of changes it
    /// came from, if any) are forgotten, all at once so that each run is read once (keys
    /// of a layer are spread over every run: a take per batch of 8192 read nearly all
    /// runs each time). Other keys on disk stay: the batches add to them.
    pub(super) fn forget_replaced_on_disk(
        &mut self,
        keys: Vec<(Vec<u8>, Option<i64>)>,
    ) -> Result<()> {
        if self.spill.as_ref().is_none_or(|s| s.bytes() == 0) {
            return Ok(());
        }
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let replaced: Vec<&[u8]> = keys
            .iter()
            .filter(|(key, _)| !self.by_key.contains_key(key.as_slice()) && seen.insert(key))
            .filter(|(key, from)| {
                from.is_some() && self.restored_from.get(key.as_slice()) != from.as_ref()
            })
            .map(|(key, _)| key.as_slice())
            .collect();
        let spill = self.spill.as_mut().expect("checked");
        for (i, record) in spill.store.take_all(&replaced)? {
            let due = Codec::parse(&record)?.due;
            spill.unlist(due, spill.store.hash_of(replaced[i]));
        }
        Ok(())
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
        let mut rows_of: HashMap<&[u8], Vec<usize>> = HashMap::default();
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
        spill.write(records)?;
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
}
