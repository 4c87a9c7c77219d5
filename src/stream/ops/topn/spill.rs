//! A TopN's partitions under the sled state backend. Up to its memory budget of partitions
//! stay in memory; at a barrier, once the results are emitted, the partitions not used
//! since the previous look (at least [`MIN_IDLE`] ago) go to disk, then, when more than
//! three quarters of the budget stays, those created since the previous barrier: an
//! entry per partition in a [`RunStore`]. Partitions brought back stay while in use. When
//! the partitions in memory outgrow what stayed by 32 MiB ([`EarlyEmitMark`]) between
//! barriers, results go out early and partitions to disk then. A row whose partition is
//! not in memory brings it back first, so ranking only ever sees partitions in memory.
//!
//! Snapshots read partitions on disk straight from the store: incremental ones those
//! moved with changes since the previous snapshot, whole ones all. (The in-memory part's
//! `reset` names them: a partition that moves with changes is listed among those gone.) A
//! restore builds partitions in memory as layers name them (bringing back those on disk)
//! and moves them to disk after each restored part, so memory holds at most a part and
//! the budget.

use datafusion::common::{DataFusionError, HashSet, Result};

use super::partitions::Id;
use super::ranked::Entry;
use super::{Partition, TopN};
use crate::stream::message::ChangeBatch;
use crate::stream::operator::StateReader;
use crate::stream::state_backend::files::RunFiles;
use crate::stream::state_backend::runs::RunStore;
use crate::stream::state_backend::{EarlyEmitMark, IdleClock, SledBackend, MIN_IDLE};

/// Partitions per group of a snapshot's part on disk.
const SNAPSHOT_PARTITIONS: usize = 8192;

/// In a record, the emitted count that says "the emitted rows are the current top".
const EMITTED_TOP: u32 = u32::MAX;

pub(super) struct Spill {
    /// Partition key -> the encoded partition.
    store: RunStore,
    /// Bytes of partitions kept in memory.
    memory: usize,
    /// Keys on disk whose partitions changed since the previous snapshot.
    changed: HashSet<Vec<u8>>,
    /// When results go out before the barrier and unused state to disk.
    pub(super) early_emit: EarlyEmitMark,
    /// When partitions were last looked at: those not used since go out next.
    pub(super) idle: IdleClock,
}

impl Spill {
    pub(super) fn open(backend: &SledBackend) -> Result<Self> {
        Ok(Self {
            store: RunStore::new(RunFiles::new(backend.scratch_dir()?)),
            memory: backend.memory,
            changed: HashSet::default(),
            early_emit: EarlyEmitMark::new(backend.memory),
            idle: IdleClock::new(MIN_IDLE),
        })
    }

    pub(super) fn bytes(&self) -> usize {
        self.store.bytes()
    }

    /// How many keys are on disk.
    #[cfg(test)]
    pub(super) fn store_len(&self) -> usize {
        self.store.len()
    }

    pub(super) fn memory(&self) -> usize {
        self.memory
    }

    /// Takes the partitions of `keys` (distinct) that are on disk out of it, each with
    /// its key's position in `keys` and whether it changed since the previous snapshot.
    pub(super) fn take_all(
        &mut self,
        keys: &[&[u8]],
        limit: usize,
    ) -> Result<Vec<(usize, Partition, bool)>> {
        let mut taken = Vec::new();
        for (i, record) in self.store.take_all(keys)? {
            taken.push((i, decode(&record, limit)?, self.changed.remove(keys[i])));
        }
        Ok(taken)
    }

    /// Deletes the partition `key` from disk, if there.
    pub(super) fn delete(&mut self, key: &[u8]) -> Result<()> {
        if self.store.remove(key)? {
            self.changed.remove(key);
        }
        Ok(())
    }
}

/// A partition's record: its rows (sort key, row, count) in rank order, then its emitted
/// rows ([`EMITTED_TOP`] when they are its current top, which need not be written).
fn encode(p: &Partition, emitted_top: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let rows: Vec<(&Entry, i64)> = p.rows.iter().collect();
    out.extend_from_slice(&(rows.len() as u32).to_le_bytes());
    for (entry, count) in rows {
        out.extend_from_slice(&(entry.sort().len() as u32).to_le_bytes());
        out.extend_from_slice(&(entry.row().len() as u32).to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(entry.sort());
        out.extend_from_slice(entry.row());
    }
    if emitted_top {
        out.extend_from_slice(&EMITTED_TOP.to_le_bytes());
    } else {
        out.extend_from_slice(&(p.emitted.len() as u32).to_le_bytes());
        for e in &p.emitted {
            out.extend_from_slice(&(e.row().len() as u32).to_le_bytes());
            out.extend_from_slice(e.row());
        }
    }
    out
}

/// Reads what [`encode`] wrote.
fn decode(record: &[u8], limit: usize) -> Result<Partition> {
    let mut r = Reader(record);
    let mut p = Partition::default();
    for _ in 0..r.u32()? {
        let (sort_len, row_len) = (r.u32()? as usize, r.u32()? as usize);
        let count = i64::from_le_bytes(r.bytes(8)?.try_into().expect("8 bytes"));
        let (sort, row) = (r.bytes(sort_len)?, r.bytes(row_len)?);
        p.rows.add(sort, row, count);
        p.present += count;
    }
    match r.u32()? {
        EMITTED_TOP => p.emitted = TopN::top(limit, &p),
        n => {
            for _ in 0..n {
                let len = r.u32()? as usize;
                p.emitted.push(Entry::new(&[], r.bytes(len)?));
            }
        }
    }
    Ok(p)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(DataFusionError::Internal(
                "a TopN partition on disk is cut short".into(),
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
}

impl TopN {
    /// Keeps partitions beyond `backend`'s memory budget on disk, if
    /// [`TopN::can_spill`].
    pub fn with_backend(mut self, backend: Option<&SledBackend>) -> Result<Self> {
        if let Some(backend) = backend.filter(|_| self.can_spill()) {
            self.spill = Some(Spill::open(backend)?);
        }
        Ok(self)
    }

    /// Whether the sled backend can keep its partitions: not with a state TTL, whose
    /// clock is not kept on disk.
    pub fn can_spill(&self) -> bool {
        self.ttl.is_none()
    }

    /// Keeps the partitions within the memory budget, after a barrier's results went
    /// out ([`TopN::move_out`]).
    pub(super) fn shed(&mut self) -> Result<()> {
        let Some(memory) = self.spill.as_ref().map(Spill::memory) else {
            return Ok(());
        };
        if self.bytes <= memory {
            if self.spill.as_mut().expect("present").idle.look().is_some() {
                for p in self.partitions.values_mut() {
                    p.used = false;
                }
            }
        } else {
            self.move_out(memory)?;
        }
        self.shed_done();
        Ok(())
    }

    /// Between barriers, partitions in memory outgrew the budget by 32 MiB
    /// ([`EarlyEmitMark`]): their results go out now and partitions to disk as at a
    /// barrier. The next time is when what stays grew by the slack again.
    pub(super) fn shed_early(&mut self, out: &mut Vec<ChangeBatch>) -> Result<()> {
        self.emit(out)?;
        let memory = self.spill.as_ref().map_or(0, Spill::memory);
        self.move_out(memory)?;
        self.shed_done();
        Ok(())
    }

    /// Moves to disk the partitions not used since the previous look (when that is at
    /// least [`MIN_IDLE`] ago), then, if more than three quarters of the budget stays,
    /// those created since the previous shed. Partitions brought back from disk since
    /// stay until they are cold: a few large ones in constant use would otherwise go
    /// and come back at every barrier.
    fn move_out(&mut self, memory: usize) -> Result<()> {
        self.move_cold()?;
        if self.bytes > memory / 4 * 3 {
            // Partitions with results still to emit stay (none, right after an emit).
            let created = self
                .partitions
                .slots_where(|p| p.created_since_shed && !p.changed);
            self.move_to_disk(created)?;
        }
        Ok(())
    }

    /// After a shed: the partitions in memory count as not created since, and the next
    /// early emit is when they outgrow what stayed.
    fn shed_done(&mut self) {
        for p in self.partitions.values_mut() {
            p.created_since_shed = false;
        }
        let stayed = self.bytes;
        if let Some(spill) = self.spill.as_mut() {
            spill.early_emit.moved(stayed);
        }
    }

    /// Moves the partitions not used since the previous look (and without results still
    /// to emit: none, right after an emit) to disk, when that look is at least
    /// [`MIN_IDLE`] ago; every partition counts as unused afterwards.
    fn move_cold(&mut self) -> Result<()> {
        let spill = self.spill.as_mut().expect("moving needs the backend");
        if spill.idle.look().is_none() {
            return Ok(());
        }
        let cold = self.partitions.slots_where(|p| {
            let cold = !p.changed && !p.used;
            p.used = false;
            cold
        });
        self.move_to_disk(cold)
    }

    /// Moves every partition without results still to emit to disk.
    pub(super) fn move_all_to_disk(&mut self) -> Result<()> {
        let movable = self.partitions.slots_where(|p| !p.changed);
        self.move_to_disk(movable)
    }

    /// Moves the partitions of slots `ids` to disk; the next snapshot resets those with
    /// changes and reads them from there.
    fn move_to_disk(&mut self, ids: Vec<Id>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let spill = self.spill.as_mut().expect("moving needs the backend");
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let (key, p) = self.partitions.remove_at(id);
            self.bytes -= Self::partition_size(&key, &p);
            let top = !p.emitted.is_empty() && Self::top(self.limit, &p) == p.emitted;
            if p.dirty {
                spill.changed.insert(key.to_vec());
                self.gone.push(key.clone());
            }
            records.push((key, encode(&p, top)));
        }
        spill
            .store
            .put_all(records.iter().map(|(k, r)| (&**k, r.as_slice())))
    }

    /// The partition `key` back from disk into memory, if it is there; listed as changed
    /// since the previous snapshot when it was.
    pub(super) fn bring_back(&mut self, key: &[u8]) -> Result<bool> {
        Ok(self.bring_back_all(&[key])? > 0)
    }

    /// The partitions of `keys` (distinct, none in memory) back from disk, reading each
    /// run once; how many were there.
    pub(super) fn bring_back_all(&mut self, keys: &[&[u8]]) -> Result<usize> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(0);
        };
        let taken = spill.take_all(keys, self.limit)?;
        let n = taken.len();
        for (i, p, dirty) in taken {
            self.bytes += Self::partition_size(keys[i], &p);
            let id = self.partitions.insert(keys[i].into(), p);
            if dirty {
                let (_, p) = self.partitions.at_mut(id).expect("inserted");
                Self::mark_dirty(&mut self.dirty, id, p);
            }
        }
        Ok(n)
    }

    /// The partitions on disk as they are now (all of them when `whole`, else those
    /// changed since the previous snapshot), read later as `rows`, `emitted` and
    /// `emitted_top` batches a group at a time. They count as snapshotted.
    pub(super) fn spilled_snapshot(&mut self, whole: bool) -> Result<Option<StateReader>> {
        let Some(spill) = self.spill.as_mut() else {
            return Ok(None);
        };
        let Some(entries) = spill.store.freeze_snapshot(&mut spill.changed, whole)? else {
            return Ok(None);
        };
        let (limit, flat) = (self.limit, self.rows_codec.is_flat());
        Ok(Some(Box::new(move |out| {
            let mut group: Vec<(Vec<u8>, Partition)> = Vec::new();
            let mut emit = |group: &mut Vec<(Vec<u8>, Partition)>| -> Result<()> {
                for batch in Self::chunk_batches(limit, flat, group)? {
                    out(batch)?;
                }
                group.clear();
                Ok(())
            };
            entries.for_each(&mut |key, record| {
                group.push((key.to_vec(), decode(record, limit)?));
                if group.len() == SNAPSHOT_PARTITIONS {
                    emit(&mut group)?;
                }
                Ok(())
            })?;
            if !group.is_empty() {
                emit(&mut group)?;
            }
            Ok(())
        })))
    }
}
