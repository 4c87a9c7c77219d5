//! A group aggregate's groups under the sled state backend. Up to its memory budget of
//! groups stay in DataFusion's structures; at a barrier, once the results are emitted,
//! the groups not touched since the previous look (at least [`MIN_IDLE`] ago) go to
//! disk, then, when more than three quarters of the budget stays, those created since
//! the previous barrier: an entry per key in a [`RunStore`], the group's row of a
//! snapshot's `groups` batch, row-encoded. Groups brought back stay while in use. When
//! the groups in memory outgrow what stayed by 32 MiB ([`EarlyEmitMark`]) between
//! barriers, results go out early and groups to disk then. A batch brings the groups of
//! its keys back first (merged into fresh accumulator groups), so aggregation only ever
//! sees groups in memory.
//!
//! Snapshots read groups on disk straight from the store's files, as the snapshot froze
//! them, off the operator's task: incremental ones those moved with changes since the
//! previous snapshot (listed in memory), whole ones all. A restore
//! writes each key's newest row to the store (a later layer's row replaces, a removal
//! deletes), so nothing is gathered in memory and every group starts on disk.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BinaryArray, RecordBatch};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{HashSet, Result};

use super::GroupAggregate;
use crate::stream::message::ChangeBatch;
use crate::stream::operator::StateReader;
use crate::stream::snapshot::{self, downcast};
use crate::stream::state_backend::files::RunFiles;
use crate::stream::state_backend::runs::RunStore;
use crate::stream::state_backend::{EarlyEmitMark, IdleClock, SledBackend, MIN_IDLE};

/// Groups per batch of a snapshot's part on disk.
const SNAPSHOT_GROUPS: usize = 8192;

pub(super) struct Spill {
    /// Group key -> the group's row.
    store: RunStore,
    /// Bytes of groups kept in memory.
    memory: usize,
    /// Rows of the columns of a `groups` batch (shared with snapshots being read).
    rows: Arc<RowConverter>,
    /// Keys on disk whose groups changed since the previous snapshot.
    changed: HashSet<Vec<u8>>,
    /// When groups were last looked at: those not touched since go out next.
    pub(super) idle: IdleClock,
    /// Input rows since the memory held was last measured, and how many between two
    /// measures (a measure walks every group).
    unmeasured_rows: usize,
    pub(super) measure_every_rows: usize,
    /// When results go out before the barrier and unused state to disk.
    pub(super) early_emit: EarlyEmitMark,
}

/// Input rows between two measures of the memory held.
const MEASURE_EVERY_ROWS: usize = 65_536;

impl Spill {
    pub(super) fn bytes(&self) -> usize {
        self.store.bytes()
    }

    /// How many keys are on disk.
    #[cfg(test)]
    pub(super) fn store_len(&self) -> usize {
        self.store.len()
    }
}

impl GroupAggregate {
    /// The row encoding of a `groups` batch's columns, when the sled backend can keep
    /// this operator's groups: keyed, without a state TTL (whose clock is not kept on
    /// disk), and with partial states arrow's row format encodes.
    pub(super) fn spill_rows(&mut self) -> Result<Option<RowConverter>> {
        if !self.keyed || self.ttl.is_some() {
            return Ok(None);
        }
        let empty = self.groups_batch(&[])?;
        let (_, _, columns) = snapshot::parts(&empty, 1)?;
        let fields: Vec<SortField> = columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect();
        if !RowConverter::supports_fields(&fields) {
            return Ok(None);
        }
        Ok(Some(RowConverter::new(fields)?))
    }

    pub(super) fn open_spill(&mut self, backend: &SledBackend) -> Result<()> {
        let Some(rows) = self.spill_rows()? else {
            return Ok(());
        };
        self.spill = Some(Spill {
            store: RunStore::new(RunFiles::new(backend.scratch_dir()?)),
            memory: backend.memory,
            rows: Arc::new(rows),
            changed: HashSet::default(),
            idle: IdleClock::new(MIN_IDLE),
            unmeasured_rows: 0,
            measure_every_rows: MEASURE_EVERY_ROWS,
            early_emit: EarlyEmitMark::new(backend.memory),
        });
        Ok(())
    }

    /// Brings the groups on disk of the keys of `keys` (key columns) back into memory.
    pub(super) fn bring_back(&mut self, keys: &[ArrayRef]) -> Result<()> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(());
        };
        if spill.store.is_empty() {
            return Ok(());
        }
        let encoded = self.key_converter.convert_columns(keys)?;
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let distinct: Vec<&[u8]> = (0..encoded.num_rows())
            .map(|i| encoded.row(i).data())
            .filter(|key| seen.insert(key))
            .collect();
        // The batch's keys at once: each run holding some is read once.
        let found: Vec<(&[u8], Vec<u8>)> = spill
            .store
            .take_all(&distinct)?
            .into_iter()
            .map(|(i, value)| (distinct[i], value))
            .collect();
        if found.is_empty() {
            return Ok(());
        }
        let parser = spill.rows.parser();
        let columns = spill
            .rows
            .convert_rows(found.iter().map(|(_, v)| parser.parse(v)))?;
        let dirty: Vec<bool> = found
            .iter()
            .map(|(key, _)| spill.changed.remove(*key))
            .collect();
        self.restore_groups(&columns)?;
        let groups = self.indices.clone();
        for (g, dirty) in groups.into_iter().zip(dirty) {
            self.created_since_shed[g] = false;
            if dirty {
                self.mark_dirty(g);
            }
        }
        Ok(())
    }

    /// Whether the groups in memory, after `rows` more input rows, outgrew what stayed at
    /// the previous look by 32 MiB ([`EarlyEmitMark`]): time for
    /// [`GroupAggregate::shed_early`].
    pub(super) fn over_budget(&mut self, rows: usize) -> bool {
        let Some(spill) = self.spill.as_mut() else {
            return false;
        };
        spill.unmeasured_rows += rows;
        if spill.unmeasured_rows < spill.measure_every_rows {
            return false;
        }
        spill.unmeasured_rows = 0;
        let mark = spill.early_emit;
        mark.is_passed(self.memory_size())
    }

    /// Keeps the groups within the memory budget, after a barrier's results went out
    /// ([`GroupAggregate::move_out`]).
    pub(super) fn shed(&mut self) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(|s| s.memory) else {
            return Ok(());
        };
        if self.memory_size() <= memory {
            self.spill.as_mut().expect("present").idle.look();
        } else {
            self.move_out(memory)?;
        }
        self.shed_done();
        Ok(())
    }

    /// Between barriers, the groups in memory outgrew the budget by 32 MiB
    /// ([`EarlyEmitMark`]): their results go out now and groups to disk as at a barrier.
    /// The next time is when what stays grew by the slack again.
    pub(super) fn shed_early(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)?;
        let memory = self.spill.as_ref().expect("present").memory;
        self.move_out(memory)?;
        self.shed_done();
        Ok(())
    }

    /// Moves to disk the groups not touched since the previous look (when that is at
    /// least [`MIN_IDLE`] ago), then, if more than three quarters of the budget stays,
    /// those created since the previous shed. Groups brought back from disk since stay
    /// until they are cold: moving every group at each barrier made a few large groups
    /// in constant use (count DISTINCT per channel and day) go and come back every time.
    fn move_out(&mut self, memory: usize) -> Result<()> {
        self.move_cold()?;
        if self.memory_size() > memory / 4 * 3 {
            // Groups with results still to emit stay (none, right after an emit).
            let created: Vec<usize> = (0..self.groups.len())
                .filter(|&g| self.created_since_shed[g] && !self.changed[g])
                .collect();
            self.move_to_disk(&created)?;
        }
        Ok(())
    }

    /// After a shed: the groups in memory count as not created since, and the next
    /// early emit is when they outgrow what stayed.
    fn shed_done(&mut self) {
        self.created_since_shed.fill(false);
        let stayed = self.memory_size();
        if let Some(spill) = self.spill.as_mut() {
            spill.early_emit.moved(stayed);
        }
    }

    /// Moves the groups not touched since the previous look (and without results still
    /// to emit) to disk, when that look is at least [`MIN_IDLE`] ago.
    fn move_cold(&mut self) -> Result<()> {
        let spill = self.spill.as_mut().expect("moving needs the backend");
        let Some(since) = spill.idle.look() else {
            return Ok(());
        };
        let cold: Vec<usize> = (0..self.groups.len())
            .filter(|&g| !self.changed[g] && self.touched[g] < since)
            .collect();
        self.move_to_disk(&cold)
    }

    /// Moves the groups `groups` (ascending, none with results still to emit) to disk.
    fn move_to_disk(&mut self, groups: &[usize]) -> Result<()> {
        if groups.is_empty() {
            return Ok(());
        }
        let batch = self.groups_batch(groups)?;
        let (_, _, columns) = snapshot::parts(&batch, 1)?;
        let spill = self.spill.as_mut().expect("moving needs the backend");
        let rows = spill.rows.convert_columns(&columns)?;
        let keys = downcast::<BinaryArray>(&columns[0])?;
        for (i, &g) in groups.iter().enumerate() {
            if self.dirty[g] {
                spill.changed.insert(keys.value(i).to_vec());
            }
        }
        spill
            .store
            .put_all((0..groups.len()).map(|i| (keys.value(i), rows.row(i).data())))?;
        let mut gone = vec![false; self.groups.len()];
        for &g in groups {
            gone[g] = true;
        }
        let keep: Vec<usize> = (0..self.groups.len()).filter(|&g| !gone[g]).collect();
        // Compacting records the keys it drops as removed: these are not.
        let removed = self.removed.len();
        self.compact(&keep)?;
        self.removed.truncate(removed);
        Ok(())
    }

    /// The groups on disk as they are now (all of them when `whole`, else those changed
    /// since the previous snapshot), read later as `groups` batches; they count as
    /// snapshotted.
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let started = self.started as i64;
        let Some(spill) = self.spill.as_mut() else {
            return Ok(None);
        };
        let Some(entries) = spill.store.freeze_snapshot(&mut spill.changed, whole)? else {
            return Ok(None);
        };
        let rows = spill.rows.clone();
        Ok(Some(Box::new(move |out| {
            let mut group: Vec<Vec<u8>> = Vec::new();
            let emit = |group: &mut Vec<Vec<u8>>,
                        out: &mut dyn FnMut(RecordBatch) -> Result<()>|
             -> Result<()> {
                let parser = rows.parser();
                let columns = rows.convert_rows(group.iter().map(|v| parser.parse(v)))?;
                group.clear();
                out(snapshot::batch("groups", &[started], columns)?)
            };
            entries.for_each(&mut |_, value| {
                group.push(value.to_vec());
                if group.len() == SNAPSHOT_GROUPS {
                    emit(&mut group, out)?;
                }
                Ok(())
            })?;
            if !group.is_empty() {
                emit(&mut group, out)?;
            }
            Ok(())
        })))
    }

    /// Restoring under the backend: each key of a snapshot batch gets its row on disk
    /// (a later layer's replaces an earlier one's; a removed key goes). A key named
    /// twice (removed twice in one epoch) counts once.
    pub(super) fn restore_to_disk(&mut self, batch: &RecordBatch) -> Result<()> {
        let kind = snapshot::kind(batch)?;
        let spill = self
            .spill
            .as_mut()
            .expect("restoring to disk needs the backend");
        let groups = kind == "groups";
        let (_, head, columns) = snapshot::parts(batch, groups as usize)?;
        let keys = downcast::<BinaryArray>(&columns[0])?;
        let rows = if groups {
            self.started |= head[0] != 0;
            Some(spill.rows.convert_columns(&columns)?)
        } else {
            None
        };
        // Newest first: a key's last row in the batch is the one kept.
        let mut seen: HashSet<&[u8]> = HashSet::default();
        let mut written = Vec::new();
        for i in (0..keys.len()).rev() {
            let key = keys.value(i);
            if !seen.insert(key) {
                continue;
            }
            match &rows {
                Some(rows) => written.push((key, rows.row(i))),
                None => {
                    spill.store.remove(key)?;
                }
            }
        }
        spill
            .store
            .put_all(written.iter().map(|(k, r)| (*k, r.data())))
    }
}
